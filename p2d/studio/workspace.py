"""Per-session workspaces: each browser session works in its own folder with its own `p2d.pipeline.Run`.

A workspace folder holds the session's run folders (``run-001``, ``run-002``, ...: a new one for
every new model/data setting), its uploads (``uploads/``) and what the app made for download
(``downloads/``). The app never writes into a run folder itself: the `Run` owns it.

A workspace is found by the Gradio session hash of the request. The page also keeps the workspace
id in the browser's localStorage (``gr.BrowserState``); after a reload the new session hash is
mapped back to the same workspace, so charts and a running job come back.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LogTail:
    """The records of a growing JSONL file (train_log.jsonl), read incrementally: each `read` parses
    only the bytes added since the last one (a half-written last line waits for the next read)."""

    def __init__(self, path: Path, key=None):
        self.path, self.key = Path(path), key
        self.records: list[dict] = []
        self._offset = 0
        self._inode = None
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                self.records, self._offset, self._inode = [], 0, None
                return self.records
            if st.st_ino != self._inode or st.st_size < self._offset:  # a new file: start over
                self.records, self._offset, self._inode = [], 0, st.st_ino
            if st.st_size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
                end = chunk.rfind(b"\n") + 1
                for line in chunk[:end].splitlines():
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:
                        pass
                self._offset += end
                self.records = list(self.records)  # a new list: readers holding the old one keep theirs
            return self.records


@dataclass
class Workspace:
    id: str
    root: Path
    run: Any = None                      # the session's p2d.pipeline.Run (set by a job)
    run_index: int = 0
    job_id: str | None = None            # latest job of this workspace
    created: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.time)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # derived values (random-pick counts, log tails)

    @property
    def upload_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def download_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def out(self) -> Path | None:
        return Path(self.run.out) if self.run is not None else None

    def next_run_dir(self) -> Path:
        """The folder the next new run gets (not created)."""
        i = self.run_index + 1
        while (self.root / f"run-{i:03d}").exists():
            i += 1
        return self.root / f"run-{i:03d}"

    def claim_run_dir(self, path: Path) -> None:
        """Note that ``path`` (from `next_run_dir`) is used now."""
        name = Path(path).name
        if Path(path).parent == self.root and name.startswith("run-") and name[4:].isdigit():
            self.run_index = max(self.run_index, int(name[4:]))

    def log(self) -> list[dict]:
        """The training log records of the current run (read incrementally; read afresh after each
        new job, since a new training starts a new log)."""
        if self.run is None:
            return []
        path = self.out / "train_log.jsonl"
        tail = self.cache.get("log")
        if tail is None or tail.path != path or tail.key != self.job_id:
            tail = self.cache["log"] = LogTail(path, self.job_id)
        return tail.read()


class Registry:
    """Workspaces by id, and which workspace each Gradio session uses."""

    def __init__(self, root: Path, max_workspaces: int = 64):
        self.root = Path(root)
        self.max = max_workspaces
        self._by_id: dict[str, Workspace] = {}
        self._by_session: dict[str, str] = {}
        self._lock = threading.Lock()

    def create(self) -> Workspace:
        with self._lock:
            ws_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            ws = Workspace(ws_id, self.root / ws_id)
            self._by_id[ws_id] = ws
            self._evict()
            return ws

    def _evict(self) -> None:
        if len(self._by_id) <= self.max:
            return
        idle = sorted(self._by_id.values(), key=lambda w: w.touched)
        for ws in idle[:len(self._by_id) - self.max]:
            self._by_id.pop(ws.id, None)
            for s, w in list(self._by_session.items()):
                if w == ws.id:
                    self._by_session.pop(s, None)

    def get(self, ws_id: str | None) -> Workspace | None:
        return self._by_id.get(ws_id) if ws_id else None

    def for_session(self, session: str | None) -> Workspace:
        """The session's workspace (created on first use)."""
        key = session or "anonymous"
        with self._lock:
            ws_id = self._by_session.get(key)
            ws = self._by_id.get(ws_id) if ws_id else None
        if ws is None:
            ws = self.create()
            with self._lock:
                self._by_session[key] = ws.id
        ws.touched = time.time()
        return ws

    def attach(self, session: str | None, ws_id: str | None) -> Workspace | None:
        """Point ``session`` at an existing workspace (page reload); None if it is unknown."""
        ws = self.get(ws_id)
        if ws is not None:
            with self._lock:
                self._by_session[session or "anonymous"] = ws.id
            ws.touched = time.time()
        return ws

    def all(self) -> list[Workspace]:
        return list(self._by_id.values())
