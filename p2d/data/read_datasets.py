"""Datasets of the ``datasets`` library: ``save_to_disk`` folders, local folders laid out like a hub dataset,
and hub ids, written ``ID[:CONFIG][@SPLIT[START:STOP]]`` (`parse_dataset_spec`).

`disk_records` reads a ``save_to_disk`` folder (of a ``DatasetDict``: ``split`` is taken);
`dataset_spec_records` streams a spec through ``datasets.load_dataset(..., streaming=True)`` (so
``max_rows`` stops the download too; ``[START:STOP]`` keeps that row range); `dataset_options` lists a
dataset's configs and splits. ``datasets`` is imported only when such a source is read.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from p2d.data.formats import Record, SkipRow
from p2d.data.sniff import SUPPORTED, file_kind, size_text
from p2d.errors import UserError, one_line


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    if not _HUB_ID.match(name) or name.count("/") > 1:
        return False
    return file_kind(Path(name)) is None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the ``datasets`` library: ``path`` (hub id or local dataset folder), ``config``, ``split``
    (None: the caller's default) and a row range ``start``:``stop`` of the split (None: open)."""

    path: str
    config: str | None = None
    split: str | None = None
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        rows = f"[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]" \
            if self.start is not None or self.stop is not None else ""
        return (self.path + (f":{self.config}" if self.config else "") + (f"@{self.split}" if self.split else "")
                + rows)


_SPEC = re.compile(r"^(?P<path>[^:@\[\]]+?)(?::(?P<config>[^:@\[\]]+))?"
                   r"(?:@(?P<split>[\w.-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?)?$")


def parse_dataset_spec(text: str) -> DatasetSpec | None:
    """``ID[:CONFIG][@SPLIT[START:STOP]]`` -> DatasetSpec, where ID is a hub id (``org/name`` or ``name``) or an
    existing folder; None for anything else (a file path, a typo'd path). UserError for a row range whose
    stop is not after its start."""
    m = _SPEC.match(str(text or "").strip())
    if not m:
        return None
    base = m["path"].strip()
    if not (Path(base).expanduser().is_dir() or looks_like_hub_id(base)):
        return None
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    if start is not None and stop is not None and stop <= start:
        raise UserError(f"{text}: the row range [{start}:{stop}] is empty; write [START:STOP] with STOP > START")
    return DatasetSpec(base, (m["config"] or "").strip() or None, m["split"], start, stop)


def _dataset_records(ds, source: str) -> Iterator[Record]:
    if len(ds) == 0:
        raise UserError(f"{source} is empty: it has no rows")

    def gen():
        for start in range(0, len(ds), 1000):
            for offset, row in enumerate(_rows_of(ds, start)):
                yield start + offset, row

    return gen()


def _rows_of(ds, start: int) -> list[dict]:
    chunk = ds[start:start + 1000]  # dict of column -> list
    names = list(chunk)
    n = len(chunk[names[0]]) if names else 0
    return [{k: chunk[k][i] for k in names} for i in range(n)]


def _pick_split(ds, split: str, source: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"split '{split}' not found in {source}; available: {', '.join(ds)}")
        return ds[split]
    return ds


def disk_records(path: Path, split: str, max_bytes: int | None) -> Iterator[Record]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk; "
                        f"give a data file instead ({SUPPORTED})")
    if max_bytes is not None:
        total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if total > max_bytes:
            raise UserError(f"{path} is larger than {size_text(max_bytes)}: use a smaller dataset")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load the dataset folder {path}: {one_line(e)}") from None
    return _dataset_records(_pick_split(ds, split, str(path)), str(path))


def is_saved_dataset(path: Path) -> bool:
    return any((path / m).exists() for m in ("dataset_info.json", "state.json", "dataset_dict.json"))


def dataset_spec_records(spec: DatasetSpec, split: str, max_bytes: int | None) -> Iterator[Record]:
    """Rows of ``spec`` streamed through ``datasets.load_dataset`` (a local folder or the hub)."""
    import datasets

    folder = Path(spec.path).expanduser()
    if folder.is_dir() and max_bytes is not None:
        total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if total > max_bytes:
            raise UserError(f"{folder} is larger than {size_text(max_bytes)}: use a smaller dataset")
    split = spec.split or split
    try:
        ds = datasets.load_dataset(str(folder) if folder.is_dir() else spec.path, spec.config, split=split,
                                   streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, not found, missing config, bad split, gated...
        if folder.is_dir():
            raise UserError(f"dataset folder {spec} could not be loaded ({one_line(e)}); a folder must be a dataset "
                            "saved with save_to_disk or hold data files laid out like a hub dataset") from None
        raise UserError(f"dataset {spec} could not be loaded from the hub or its local cache ({one_line(e)}); check "
                        "the id, CONFIG (id:config) and SPLIT (id@split), or the network") from None

    def gen():
        rows = itertools.islice(iter(ds), spec.start or 0, spec.stop)
        index = 0
        while True:
            try:
                row = next(rows, None)
            except Exception as e:  # noqa: BLE001 - a stream can fail part-way (network, bad shard)
                raise UserError(f"reading dataset {spec} failed after {index} rows ({one_line(e)})") from None
            if row is None:
                if index == 0:
                    raise UserError(f"dataset {spec} is empty: it has no rows" +
                                    (" in that row range" if spec.start or spec.stop else ""))
                return
            yield index, dict(row) if isinstance(row, dict) else SkipRow("not a JSON object")
            index += 1

    return gen()


def dataset_options(path: str) -> dict:
    """The configs of the dataset ``path`` (hub id or local dataset folder) and each config's splits:
    ``{"configs": [...], "splits": {config: [...]}}``, through ``datasets``' listing functions (hub ids need
    the network or the local cache). UserError with one line when they cannot be listed."""
    from datasets import get_dataset_config_names, get_dataset_split_names

    spec = parse_dataset_spec(path)
    if spec is None:
        raise UserError(f"{path!r} is not a dataset id (org/name) or a dataset folder")
    target = str(Path(spec.path).expanduser()) if Path(spec.path).expanduser().is_dir() else spec.path
    try:
        configs = list(get_dataset_config_names(target))
        splits = {c: list(get_dataset_split_names(target, c)) for c in configs}
    except Exception as e:  # noqa: BLE001 - offline, not found, gated...
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").strip() in ("1", "true", "yes") or \
            os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "yes")
        raise UserError(f"could not list the configs and splits of {spec.path}"
                        + (" (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if offline else
                           f" ({one_line(e, 120)})")
                        + "; type them by hand as id:config@split") from None
    return {"configs": configs, "splits": splits}
