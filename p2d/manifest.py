"""When a stored result still counts: the one validity rule of runs, benchmark units and controls.

A result is stored with an *entry*::

    {"settings": {...}, "inputs": {name: digest, ...}, "digest": "...", "partial": false,
     "finished_at": "...", ...}

``settings`` are the values the result depends on directly, ``inputs`` the digests of the results it
was built on, ``digest`` identifies this result (a content digest where the content is small and
decides everything downstream, e.g. the selected heads; otherwise a fresh random id, so anything
built on it is out of date once it is redone). An entry counts (`is_valid`) only when it is
complete, its settings equal the current ones and its inputs equal the current digests of those
results. Anything else is redone, never silently reused.

Two stores use the same entries:

- `Manifest`: one JSON file of named entries, written by one process (a run's ``stages.json``);
- `EntryFiles`: one JSON file per entry, result included (the benchmark's units: several processes
  may write into one folder tree without racing on a shared file).

`p2d.pipeline.Run`, the benchmark (`p2d.bench`) and `p2d.controls` all decide validity with `is_valid`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

from .files import read_json, write_json

__all__ = ["content_digest", "fresh_digest", "make_entry", "is_valid", "Manifest", "EntryFiles"]


def content_digest(obj) -> str:
    """A short digest of a JSON-able value (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fresh_digest() -> str:
    """A new random digest, for results whose content is not worth hashing."""
    return uuid.uuid4().hex[:16]


def make_entry(settings: dict, inputs: dict, digest: str, partial: bool = False, **extra) -> dict:
    return {"settings": settings, "inputs": inputs, "partial": bool(partial),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "digest": digest, **extra}


def is_valid(entry: dict | None, settings: dict, inputs: dict) -> bool:
    """A complete entry made with these settings, built on these input digests (None never matches)."""
    if not entry or entry.get("partial"):
        return False
    if _as_json(entry.get("settings")) != _as_json(settings):
        return False
    return all(d is not None and entry.get("inputs", {}).get(k) == d for k, d in inputs.items())


def _as_json(value):
    """The value as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class Manifest:
    """Named entries in one JSON file (``{"stages": {name: entry}}``), rewritten atomically on change."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}

    @classmethod
    def read(cls, path) -> "Manifest":
        m = cls(path)
        m.entries = dict((read_json(m.path) or {}).get("stages") or {})
        return m

    def get(self, name: str, default=None) -> dict | None:
        return self.entries.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> dict:
        return self.entries[name]

    def put(self, name: str, entry: dict) -> None:
        self.entries[name] = entry
        self.write()

    def drop(self, name: str) -> bool:
        if name not in self.entries:
            return False
        del self.entries[name]
        self.write()
        return True

    def write(self) -> None:
        write_json(self.path, {"stages": self.entries})


class EntryFiles:
    """One JSON file per entry under ``root`` (``key`` = path parts, the last one the file name)."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, key: tuple[str, ...]) -> Path:
        return self.root.joinpath(*key[:-1], key[-1] + ".json")

    def get(self, key: tuple[str, ...]) -> dict | None:
        return read_json(self.path(key))

    def valid(self, key: tuple[str, ...], settings: dict, inputs: dict) -> dict | None:
        """The entry (with its ``result``) when it is valid for these settings and inputs, else None."""
        entry = self.get(key)
        return entry if is_valid(entry, settings, inputs) else None

    def put(self, key: tuple[str, ...], settings: dict, inputs: dict, result, digest: str | None = None,
            **extra) -> dict:
        entry = make_entry(settings, inputs, digest or fresh_digest(), result=result, **extra)
        write_json(self.path(key), entry)
        return entry
