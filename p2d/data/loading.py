"""Load a dataset from a file, a folder or the hub into `Sample`s.

Supported sources:

- ``.jsonl`` / ``.ndjson``: parsed line by line; malformed lines ("malformed JSON line"), lines that
  are not UTF-8 ("not UTF-8") and lines that are not objects ("not a JSON object") are skipped and
  counted.
- ``.json``: an array of objects, an object with a single list field (``{"data": [...]}``; with
  several list fields the one named like ``split`` is used), or a single record.  A ``.json`` file
  that is really JSON Lines is read as such.
- ``.csv`` / ``.tsv``: header row required; every cell is read as text (empty cells are empty).
- ``.parquet``.
- any of the text formats above compressed as ``.gz`` (e.g. ``data.jsonl.gz``).
- a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: ``split`` is
  taken).
- a hub dataset id (``org/name``), via ``datasets.load_dataset(id, split=split)``; fails with a
  UserError when offline or not found.

Text files must be UTF-8 (a BOM is fine).  Every user-caused problem raises `p2d.errors.UserError`
with a one-line message; unusable rows are skipped and counted in `LoadedData.skipped`, and loading
fails only when no usable row remains.

The row shape is detected from the columns of the first 1000 rows (see `p2d.data.formats`).  With
``limit``, reading stops once ``limit`` usable samples are collected, so skip counts cover only the
rows read.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from p2d.data.formats import (
    Sample,
    SkipRow,
    check_mapping,
    detect_format,
    mapping_has_content,
    row_to_sample,
)
from p2d.errors import UserError

SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet (optionally .gz), a save_to_disk folder or a hub id"
_DETECT_ROWS = 1000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedData:
    """Samples plus what happened while loading them."""

    samples: list[Sample]
    format: str  # one of formats.FORMATS, or "mapped"
    columns: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> dict:
        """Plain-dict report: source, rows, skipped (total), skipped_reasons, format, columns,
        tasks (label -> count; ``{}`` when no row has a label)."""
        tasks = Counter(s.task for s in self.samples if s.task is not None)
        return {
            "source": self.source,
            "rows": len(self.samples),
            "skipped": sum(self.skipped.values()),
            "skipped_reasons": dict(self.skipped),
            "format": self.format,
            "columns": list(self.columns),
            "tasks": dict(tasks),
        }


# A record is (index, row) for a row dict, or (index, SkipRow) for a row already known bad.
Record = tuple[int, "dict | SkipRow"]


def load_records(rows: Iterable[dict], source: str = "<memory>", mapping: dict | None = None,
                 limit: int | None = None) -> LoadedData:
    """Same as `load_data` for rows already in memory (never mutated; each Sample keeps a shallow
    copy of its row)."""
    records = ((i, dict(r) if isinstance(r, dict) else SkipRow("not a JSON object"))
               for i, r in enumerate(rows))
    return _build(records, source, mapping, limit)


def load_data(source: str | os.PathLike, mapping: dict | None = None, split: str = "train",
              limit: int | None = None) -> LoadedData:
    """Load ``source`` (a path or hub id; see the module docstring) into samples.

    mapping: optional column mapping (see `p2d.data.formats`); split: used for DatasetDict folders
    and hub ids; limit: maximum number of usable samples.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 (got {limit})")
    text = os.fspath(source)
    name = text.strip()
    if not name:
        raise UserError("no data source given; pass a file, a folder or a hub dataset id")
    path = Path(name).expanduser()
    if path.is_dir():
        records = _disk_records(path, split)
    elif path.exists():
        records = _file_records(path, split)
    elif _looks_like_hub_id(name):
        records = _hub_records(name, split)
    else:
        raise UserError(f"file not found: {name}")
    return _build(records, name, mapping, limit)


# --- building samples ---------------------------------------------------------


def _build(records: Iterator[Record], source: str, mapping: dict | None,
           limit: int | None) -> LoadedData:
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 (got {limit})")
    records = iter(records)
    head = list(itertools.islice(records, _DETECT_ROWS))
    columns: dict[str, None] = {}
    for _, row in head:
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
    skipped: Counter[str] = Counter()
    if not head:
        raise UserError(f"{source} is empty: it has no rows")
    if not columns:
        # Only bad records in the first rows; count them all before giving up.
        for _, row in itertools.chain(head, records):
            skipped[row.reason if isinstance(row, SkipRow) else "not a JSON object"] += 1
        raise UserError(f"no usable rows in {source} ({_reasons(skipped)})")

    col_list = list(columns)
    checked = check_mapping(mapping, col_list)
    if mapping_has_content(checked):
        fmt = "mapped"
    else:
        fmt = detect_format(col_list)

    samples: list[Sample] = []
    for index, row in itertools.chain(head, records):
        if limit is not None and len(samples) >= limit:
            break
        if isinstance(row, SkipRow):
            skipped[row.reason] += 1
            continue
        for key in row:
            if key not in columns:
                columns[key] = None
        try:
            samples.append(row_to_sample(row, index, fmt, checked))
        except SkipRow as skip:
            skipped[skip.reason] += 1

    if not samples:
        raise UserError(
            f"no usable rows in {source} ({_reasons(skipped)}); fix the rows or pass a column mapping"
        )
    return LoadedData(samples, fmt, list(columns), dict(skipped), source)


def _reasons(skipped: Counter) -> str:
    if not skipped:
        return "no rows"
    return "skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())


def _looks_like_hub_id(name: str) -> bool:
    if not _HUB_ID.match(name) or name.count("/") > 1:
        return False
    return _file_kind(Path(name)) is None


# --- files ------------------------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    if not suffixes:
        return None
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".tsv": "tsv", ".parquet": "parquet"}.get(suffixes[-1])


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise UserError(f"could not read {path}: {_one_line(e)}") from None


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None


def _file_records(path: Path, split: str) -> Iterator[Record]:
    kind = _file_kind(path)
    if kind is None:
        raise UserError(f"unsupported file type '{''.join(path.suffixes) or path.name}' for {path}; "
                        f"use {SUPPORTED}")
    if kind == "parquet":
        return _parquet_records(path)
    data = _read_bytes(path)
    if not data.strip():
        raise UserError(f"{path} is empty")
    if kind == "jsonl":
        return _jsonl_records(data)
    if kind == "json":
        return _json_records(data, path, split)
    text = _decode(data, path)
    return _csv_records(text, path, "\t" if kind == "tsv" else _csv_delimiter(text))


def _jsonl_records(data: bytes) -> Iterator[Record]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    index = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            row = json.loads(line)
            rec = row if isinstance(row, dict) else SkipRow("not a JSON object")
        except UnicodeDecodeError:
            rec = SkipRow("not UTF-8")
        except ValueError:
            rec = SkipRow("malformed JSON line")
        yield index, rec
        index += 1


def _json_records(data: bytes, path: Path, split: str) -> Iterator[Record]:
    text = _decode(data, path)
    try:
        obj = json.loads(text)
    except ValueError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:
            is_jsonl = isinstance(json.loads(first), dict)
        except ValueError:
            is_jsonl = False
        if is_jsonl:  # JSON Lines saved as .json
            return _jsonl_records(data)
        raise UserError(f"{path} is not valid JSON ({e}); fix the file or save it as JSON Lines") from None
    if isinstance(obj, dict):
        obj = _rows_in_object(obj, path, split)
    if not isinstance(obj, list):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}; expected an array of objects "
                        "or an object with one list field")
    return ((i, r if isinstance(r, dict) else SkipRow("not a JSON object")) for i, r in enumerate(obj))


def _rows_in_object(obj: dict, path: Path, split: str) -> list:
    """The rows inside a top-level JSON object."""
    # Candidate row lists: lists of objects (or empty), other than a record's own chat turns.
    lists = [k for k, v in obj.items()
             if isinstance(v, list) and (not v or isinstance(v[0], dict))
             and str(k).strip().lower() not in ("messages", "conversations")]
    if not lists:
        try:
            detect_format(list(obj))
            return [obj]  # the object is itself one record, e.g. {"messages": [...]}
        except UserError:
            pass
    if len(lists) == 1:
        return obj[lists[0]]
    if split in lists:
        return obj[split]
    if not lists:
        raise UserError(f"{path} holds a JSON object with no list of rows; expected an array of "
                        "objects or an object like {\"data\": [...]}")
    raise UserError(f"{path} has several list fields ({', '.join(lists)}); keep only the one with "
                    "the rows")


def _csv_delimiter(text: str) -> str:
    """',' unless the header line has none and uses ';' (European Excel exports) instead."""
    header = text.split("\n", 1)[0]
    return ";" if "," not in header and ";" in header else ","


def _csv_records(text: str, path: Path, delimiter: str) -> Iterator[Record]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next(reader)
        except csv.Error as e:
            raise UserError(f"could not parse {path}: {e}") from None
        header = [h.strip() for h in header]
        if not any(header):
            raise UserError(f"{path} has an empty header row; the first line must name the columns")
        rows: list[Record] = []
        index = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise UserError(f"could not parse {path} near row {index + 2}: {e}") from None
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                rows.append((index, SkipRow("wrong number of fields")))
            else:
                cells = cells + [""] * (len(header) - len(cells))
                rows.append((index, {h: c for h, c in zip(header, cells) if h}))
            index += 1
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        raise UserError(f"{path} has a header but no rows")
    return iter(rows)


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise UserError(f"could not read Parquet file {path}: {_one_line(e)}") from None
    if pf.metadata.num_rows == 0:
        raise UserError(f"{path} is empty: it has no rows")

    def gen():
        index = 0
        for batch in pf.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                yield index, row
                index += 1

    return gen()


# --- datasets folders and the hub -------------------------------------------------------


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


def _disk_records(path: Path, split: str) -> Iterator[Record]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk; "
                        f"give a data file instead ({SUPPORTED})")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load the dataset folder {path}: {_one_line(e)}") from None
    return _dataset_records(_pick_split(ds, split, str(path)), str(path))


def _hub_records(name: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline, not found, bad split, gated...
        raise UserError(f"dataset '{name}' could not be found locally or on the hub "
                        f"({_one_line(e)}); check the path or id, or download it first") from None
    return _dataset_records(ds, name)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
