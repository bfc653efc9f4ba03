"""Load a dataset from a file, a folder or the hub into `Sample`s.

Supported sources:

- ``.jsonl`` / ``.ndjson``, streamed line by line; malformed lines ("malformed JSON line"), lines
  that are not UTF-8 ("not UTF-8") or not objects ("not a JSON object") are skipped and counted;
  blank lines are not rows.  A JSON document saved as ``.jsonl`` (first line opens an array or an
  unfinished object, or is like ``{"data": [...]}``) is read as ``.json`` when it parses so.
- ``.json`` (read whole): an array of objects, an object with a single list field
  (``{"data": [...]}``; with several, the one named like ``split``), or a single record; JSON
  Lines saved as ``.json`` is read as such.
- ``.csv`` / ``.tsv``, streamed: header row required; cells are text (empty cells are empty);
  quoted cells may span lines; ``;`` is the delimiter when the header has no ``,``.
- ``.parquet``, read in batches.
- the text formats above compressed as ``.gz`` (e.g. ``data.jsonl.gz``), streamed.
- a ``datasets`` ``save_to_disk`` folder (of a ``DatasetDict``: ``split`` is taken).
- a dataset of the ``datasets`` library, written ``ID[:CONFIG][@SPLIT[START:STOP]]`` (`parse_dataset_spec`):
  a hub id (``openai/gsm8k:main@test``) or a local folder laid out like a hub dataset repository (data
  files, optionally a README.md whose YAML ``configs`` name the configs and their splits), read with
  ``datasets.load_dataset(ID, CONFIG, split=SPLIT, streaming=True)``: rows are streamed, so ``max_rows``
  stops the download too. Without ``@SPLIT`` the ``split`` argument (default ``train``) is used;
  ``[START:STOP]`` keeps that row range of the split (``@train[:100]`` for a probe, ``@train[100:]`` for
  the pool: the two never overlap). `dataset_options` lists a dataset's configs and splits.

Not supported: Excel workbooks, ZIP archives, text that is not UTF-8 (UTF-16, Latin-1),
``.parquet.gz``, several row shapes in one file.  Such files fail with a UserError saying so.

Text must be UTF-8 (a BOM and CRLF line ends are fine).  User-caused problems raise
`p2d.errors.UserError` with a one-line message; unusable rows are skipped and counted in
`LoadedData.skipped`, and loading fails only when no usable row remains.  Without ``max_rows``,
``len(samples) + sum(skipped.values())`` is the number of rows read (JSONL: non-blank lines; CSV:
non-blank records after the header; JSON: list items).  Rows nested deeper than ``MAX_DEPTH`` are
skipped ("too deeply nested"); lone UTF-16 surrogates (JSON escapes like ``"\\ud800"``, which
cannot be written as UTF-8) are replaced by U+FFFD and the kept rows so changed are counted in
`LoadedData.repaired`.  The row shape is the one most of the first 1000 rows match (see
`p2d.data.formats`); rows of another recognised shape are counted as "different shape (X) than
the file's (Y)".

Limits (optional, for untrusted input), applied while the source is read (nothing is read whole):

- ``max_rows`` (``limit`` is its old name): keep at most this many usable samples; reading stops
  there and `LoadedData.truncated` says whether rows were left unread (skip counts cover the rows
  read; the shape is detected from the first ``min(1000, max_rows)`` rows).  Reading also stops after
  ``max(1000, 10 * max_rows)`` skipped rows (a file of unusable rows is refused, or cut, quickly).
- ``max_bytes``: UserError for a source that needs more bytes read: text files count decompressed
  bytes and never read past the cap (a gzip bomb stops there; a larger file is fine when
  ``max_rows`` is reached first); Parquet files count their size on disk, the uncompressed size
  their metadata declares, and the bytes of the values read; ``save_to_disk`` folders (and local
  dataset folders) count their size on disk.  Not applied to hub ids.
- ``max_field_chars``: a row with a text (a value or a key) longer than this is skipped ("a field
  longer than N characters"); a row longer than ``max(1 MiB, 4 * max_field_chars)`` bytes (a JSON
  Lines line, a JSON item, a Parquet row's values) is skipped before it is parsed ("row longer
  than ..."); a CSV cell that long stops the file with a UserError.

JSON documents are streamed: one over ``max(1 MiB, 4 * max_field_chars)`` (8 MiB without
``max_field_chars``) is read item by item (a top-level array, or the list of rows of a top-level
object, which is found in a first pass that looks at most at ``max_rows`` plus the skip allowance
items of each list); a smaller one is parsed whole.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from p2d.data.formats import (
    Sample,
    SkipRow,
    check_mapping,
    detect_format,
    mapping_has_content,
    match_format,
    row_shape,
    row_to_sample,
    shape_conflict,
)
from p2d.errors import UserError

# pyarrow (Parquet) and datasets (save_to_disk folders, hub ids) are imported only for the sources that need them

SUPPORTED = (".jsonl, .json, .csv, .tsv, .parquet (optionally .gz), a save_to_disk folder or a dataset "
             "ID[:CONFIG][@SPLIT] (hub id or dataset folder)")
MAX_DEPTH = 100  # nesting levels of a row (the row itself is level 1; a chat message is level 3)
TOO_DEEP = "too deeply nested"
SURROGATES_REPLACED = "invalid characters (lone surrogates) replaced with U+FFFD"
_DETECT_ROWS = 1000
_SNIFF_BYTES = 8192
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_KIND_NAMES = {"jsonl": "JSON Lines", "json": "JSON", "csv": "CSV", "tsv": "TSV"}
_ROW_BYTES = 1 << 20        # the least row cap when max_field_chars is set (a row may hold several fields)
_WHOLE_JSON = 8 << 20       # without max_field_chars: JSON documents up to this are parsed whole
_PARQUET_BATCH = 64         # Parquet rows converted to Python at a time


def _row_cap(max_field_chars: int | None) -> int | None:
    """The longest row (in bytes) read when fields are capped (None: no cap)."""
    return None if max_field_chars is None else max(_ROW_BYTES, 4 * max_field_chars)


def _skip_cap(max_rows: int | None) -> int | None:
    """Skipped rows after which reading stops (None: read everything)."""
    return None if max_rows is None else max(1000, 10 * max_rows)


@dataclass
class LoadedData:
    """Samples plus what happened while loading them."""

    samples: list[Sample]
    format: str  # one of formats.FORMATS, or "mapped"
    columns: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped
    source: str = ""
    repaired: dict[str, int] = field(default_factory=dict)  # what was fixed -> kept rows changed
    truncated: bool = False  # reading stopped at max_rows with rows left unread

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> dict:
        """Plain-dict report: source, rows, skipped (total), skipped_reasons, repaired (what was
        fixed -> rows), truncated, format, columns, tasks (label -> count; ``{}`` when no row has a
        label)."""
        tasks = Counter(s.task for s in self.samples if s.task is not None)
        return {
            "source": self.source,
            "rows": len(self.samples),
            "skipped": sum(self.skipped.values()),
            "skipped_reasons": dict(self.skipped),
            "repaired": dict(self.repaired),
            "truncated": self.truncated,
            "format": self.format,
            "columns": list(self.columns),
            "tasks": dict(tasks),
        }


# A record is (index, row) for a row dict, or (index, SkipRow) for a row already known bad.
Record = tuple[int, "dict | SkipRow"]


def load_records(rows: Iterable[dict], source: str = "<memory>", mapping: dict | None = None,
                 max_rows: int | None = None, *, limit: int | None = None,
                 max_field_chars: int | None = None) -> LoadedData:
    """Same as `load_data` for rows already in memory (never mutated; each Sample keeps a shallow
    copy of its row)."""
    max_rows = _check_max_rows(max_rows, limit)
    records = ((i, dict(r) if isinstance(r, dict) else SkipRow("not a JSON object"))
               for i, r in enumerate(rows))
    with _one_line_errors():
        return _build(records, source, mapping, max_rows, max_field_chars)


def load_data(source: str | os.PathLike, mapping: dict | None = None, split: str = "train",
              max_rows: int | None = None, *, max_bytes: int | None = None,
              limit: int | None = None, max_field_chars: int | None = None) -> LoadedData:
    """Load ``source`` (a path or hub id; see the module docstring) into samples.

    mapping: optional column mapping (see `p2d.data.formats`); split: used for DatasetDict folders
    and hub ids; max_rows (alias ``limit``): keep at most this many usable samples; max_bytes:
    refuse sources that need more bytes read; max_field_chars: skip rows with a longer text (see
    the module docstring).
    """
    with _one_line_errors():
        return _load_data(source, mapping, split, max_rows, max_bytes, limit, max_field_chars)


def _load_data(source, mapping, split, max_rows, max_bytes, limit, max_field_chars) -> LoadedData:
    max_rows = _check_max_rows(max_rows, limit)
    if max_bytes is not None and max_bytes < 1:
        raise UserError(f"max_bytes must be at least 1 (got {max_bytes})")
    if max_field_chars is not None and max_field_chars < 1:
        raise UserError(f"max_field_chars must be at least 1 (got {max_field_chars})")
    text = os.fspath(source)
    name = text.strip()
    if not name:
        raise UserError("no data source given; pass a file, a folder or a hub dataset id")
    path = Path(name).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        records = _disk_records(path, split, max_bytes)
    elif path.exists() and not path.is_dir():
        records = _file_records(path, split, max_bytes, _row_cap(max_field_chars), _skip_cap(max_rows))
    elif (spec := parse_dataset_spec(name)) is not None:
        records = _dataset_spec_records(spec, split, max_bytes)
    else:
        raise UserError(f"file not found: {name}")
    return _build(records, name, mapping, max_rows, max_field_chars)


@contextlib.contextmanager
def _one_line_errors():
    """UserError messages stay on one line even when they quote a file name or cell with a line
    break."""
    try:
        yield
    except UserError as e:
        lines = str(e).splitlines()
        if len(lines) > 1:
            raise UserError(" ".join(line.strip() for line in lines)) from None
        raise


def _check_max_rows(max_rows: int | None, limit: int | None) -> int | None:
    if limit is not None and max_rows is not None and limit != max_rows:
        raise UserError(f"limit and max_rows are the same setting; give one (got {limit} and {max_rows})")
    name = "limit" if limit is not None else "max_rows"
    value = limit if limit is not None else max_rows
    if value is not None and value < 1:
        raise UserError(f"{name} must be at least 1 (got {value})")
    return value


# --- building samples ---------------------------------------------------------


def _build(records: Iterator[Record], source: str, mapping: dict | None,
           max_rows: int | None, max_field_chars: int | None = None) -> LoadedData:
    repaired_rows: set[int] = set()
    records = _checked(iter(records), repaired_rows, max_field_chars)
    max_skipped = _skip_cap(max_rows)
    detect_rows = _DETECT_ROWS if max_rows is None else min(_DETECT_ROWS, max_rows)
    # Read ahead until enough object rows are seen to detect the shape (bad records in between).
    head: list[Record] = []
    n_objects = 0
    for rec in records:
        head.append(rec)
        if isinstance(rec[1], dict):
            n_objects += 1
            if n_objects >= detect_rows:
                break
    columns: dict[str, None] = {}
    for _, row in head:
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
    skipped: Counter[str] = Counter()
    if not head:
        raise UserError(f"{source} is empty: it has no rows")
    if not columns:  # no object row at all (the loop above read everything)
        for _, row in head:
            skipped[row.reason if isinstance(row, SkipRow) else "not a JSON object"] += 1
        raise UserError(f"no usable rows in {source} ({_reasons(skipped)})")

    col_list = list(columns)
    checked = check_mapping(mapping, col_list)
    if mapping_has_content(checked):
        fmt = "mapped"
    else:
        fmt = _majority_shape([row for _, row in head if isinstance(row, dict)], col_list)

    samples: list[Sample] = []
    repaired = 0
    truncated = False
    for index, row in itertools.chain(head, records):
        if max_rows is not None and len(samples) >= max_rows:
            truncated = True
            break
        if max_skipped is not None and sum(skipped.values()) >= max_skipped:
            if not samples:
                raise UserError(f"no usable rows in the first {sum(skipped.values())} rows of {source} "
                                f"({_reasons(skipped)}); fix the rows or pass a column mapping")
            truncated = True
            break
        if isinstance(row, SkipRow):
            skipped[row.reason] += 1
            continue
        for key in row:
            if key not in columns:
                columns[key] = None
        try:
            if fmt != "mapped":
                other = shape_conflict(row, fmt)
                if other is not None:
                    raise SkipRow(f"different shape ({other}) than the file's ({fmt})")
            sample = row_to_sample(row, index, fmt, checked)
        except SkipRow as skip:
            skipped[skip.reason] += 1
            continue
        fixed = _fix_sample(sample)
        if fixed is not None:
            sample = fixed
            repaired_rows.add(index)
        if index in repaired_rows:
            repaired += 1
        samples.append(sample)

    if not samples:
        raise UserError(
            f"no usable rows in {source} ({_reasons(skipped)}); fix the rows or pass a column mapping"
        )
    return LoadedData(samples, fmt, list(columns), dict(skipped), source,
                      {SURROGATES_REPLACED: repaired} if repaired else {}, truncated)


def _majority_shape(rows: list[dict], columns: list[str]) -> str:
    """The shape most rows match on their own (first seen wins a tie); when no single row matches
    one, the shape of all columns together (UserError listing them if none)."""
    shapes = Counter(s for s in map(row_shape, rows) if s is not None)
    if shapes:
        return shapes.most_common(1)[0][0]
    return detect_format(columns)


def _checked(records: Iterator[Record], repaired: set[int], max_field_chars: int | None = None) -> Iterator[Record]:
    """Rows too deeply nested, or with a text longer than ``max_field_chars``, become SkipRows; rows
    with lone surrogates are repaired (their indices are added to ``repaired``)."""
    for index, row in records:
        if isinstance(row, dict):
            deep, bad_text = _inspect(row)
            if deep:
                row = SkipRow(TOO_DEEP)
            elif max_field_chars is not None and _longest_text(row) > max_field_chars:
                row = SkipRow(f"a field longer than {max_field_chars} characters")
            elif bad_text:
                row = _fix_text(row)
                repaired.add(index)
        yield index, row


def _inspect(row: dict) -> tuple[bool, bool]:
    """(nested deeper than MAX_DEPTH or holding a too-deep marker, has lone surrogates); iterative."""
    bad_text = False
    stack = [(row, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True, bad_text
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(key, str) and not bad_text and _SURROGATE.search(key):
                bad_text = True
            if isinstance(value, str):
                if not bad_text and not value.isascii() and _SURROGATE.search(value):
                    bad_text = True
            elif isinstance(value, (dict, list, tuple)):
                stack.append((value, depth + 1))
            elif isinstance(value, SkipRow):  # a value the JSON reader found too deep
                return True, bad_text
    return False, bad_text


def _longest_text(row: dict) -> int:
    """Characters of the longest string (key or value) anywhere in ``row``; iterative."""
    longest = 0
    stack: list = [row]
    while stack:
        obj = stack.pop()
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(key, str):
                longest = max(longest, len(key))
            if isinstance(value, (str, bytes)):
                longest = max(longest, len(value))
            elif isinstance(value, (dict, list, tuple)):
                stack.append(value)
    return longest


def _fix_text(obj):
    """A copy of ``obj`` with lone surrogates in strings (keys too) replaced by U+FFFD."""
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        return {_fix_text(k): _fix_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fix_text(v) for v in obj)
    return obj


def _fix_sample(sample: Sample) -> Sample | None:
    """The sample with lone surrogates replaced (they can come from a chat cell's JSON escapes),
    or None when it has none."""
    texts = [sample.answer, sample.task or ""] + [t.get("content", "") for t in sample.prompt]
    if all(not isinstance(t, str) or t.isascii() or not _SURROGATE.search(t) for t in texts):
        return None
    return replace(sample, answer=_fix_text(sample.answer), task=_fix_text(sample.task),
                   prompt=_fix_text(sample.prompt), row=_fix_text(sample.row))


def _reasons(skipped: Counter) -> str:
    if not skipped:
        return "no rows"
    return "skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())


def _looks_like_hub_id(name: str) -> bool:
    if not _HUB_ID.match(name) or name.count("/") > 1:
        return False
    return _file_kind(Path(name)) is None


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
    if not (Path(base).expanduser().is_dir() or _looks_like_hub_id(base)):
        return None
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    if start is not None and stop is not None and stop <= start:
        raise UserError(f"{text}: the row range [{start}:{stop}] is empty; write [START:STOP] with STOP > START")
    return DatasetSpec(base, (m["config"] or "").strip() or None, m["split"], start, stop)


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


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


class _CappedReader(io.RawIOBase):
    """Raw reader over a file or gzip stream (decompressed) that hands out at most ``cap`` bytes
    and raises a UserError when more are asked for and the stream has more; gzip and I/O errors
    become UserErrors too."""

    def __init__(self, path: Path, cap: int | None):
        super().__init__()
        self.path, self.cap, self.total = path, cap, 0
        self.gz = path.suffix.lower() == ".gz"
        try:
            self.f = gzip.open(path, "rb") if self.gz else open(path, "rb", buffering=0)
        except OSError as e:
            raise UserError(f"could not read {path}: {_one_line(e)}") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.cap is not None:
            room = self.cap - self.total
            if room <= 0:
                if self._read(bytearray(1)) == 0:
                    return 0
                grows = "expands beyond" if self.gz else "is larger than"
                raise UserError(f"{self.path} {grows} {_size(self.cap)}: use a smaller file")
            if len(buf) > room:
                buf = memoryview(buf)[:room]
        n = self._read(buf)
        self.total += n
        return n

    def _read(self, buf) -> int:
        try:
            return self.f.readinto(buf) or 0
        except (OSError, EOFError, zlib.error) as e:
            if self.gz:
                raise UserError(f"{self.path} is not a valid gzip file or is cut short ({_one_line(e)}); "
                                "compress it again with gzip or drop the .gz suffix") from None
            raise UserError(f"could not read {self.path}: {_one_line(e)}") from None

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


def _open_bytes(path: Path, cap: int | None) -> BinaryIO:
    return io.BufferedReader(_CappedReader(path, cap), buffer_size=1 << 16)


def _sniff(path: Path, kind: str, cap: int | None) -> bytes:
    """The first bytes of a text file (decompressed), after refusing empty and non-text files."""
    with _open_bytes(path, cap) as f:
        head = f.read(_SNIFF_BYTES if cap is None else min(_SNIFF_BYTES, cap))
    body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    if not body.strip() and len(head) < _SNIFF_BYTES:
        raise UserError(f"{path} is empty")
    what = _KIND_NAMES[kind]
    for magic, found in ((b"PK\x03\x04", "a ZIP archive or Excel workbook"),
                         (b"\xd0\xcf\x11\xe0", "an old Excel/Office file"),
                         (b"PAR1", "a Parquet file"),
                         (b"SQLite format 3\x00", "an SQLite database")):
        if head.startswith(magic):
            raise UserError(f"{path} is {found}, not {what} text; export or save the data as "
                            f"{SUPPORTED.split(' (')[0]}")
    if head.startswith(b"\x1f\x8b"):
        raise UserError(f"{path} holds gzip-compressed data; name it {path.name}.gz or decompress it")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path} is UTF-16 text; re-save it as UTF-8")
    if _looks_binary(head):
        raise UserError(f"{path} looks like a binary file, not {what} text; check that you picked the "
                        "right file")
    return head


def _looks_binary(head: bytes) -> bool:
    """More than 10% of the characters are invalid UTF-8 or control characters."""
    text = head.decode("utf-8", errors="replace")
    if len(head) == _SNIFF_BYTES:
        text = text[:-3]  # a multi-byte character may be cut at the end
    if not text:
        return False
    bad = sum(1 for ch in text if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v\x1b"))
    return bad > len(text) / 10


def _file_records(path: Path, split: str, max_bytes: int | None, row_cap: int | None = None,
                  skip_cap: int | None = None) -> Iterator[Record]:
    kind = _file_kind(path)
    if kind is None:
        raise UserError(f"unsupported file type '{''.join(path.suffixes) or path.name}' for {path}; "
                        f"use {SUPPORTED}")
    if kind == "parquet":
        return _parquet_records(path, max_bytes, row_cap)
    head = _sniff(path, kind, max_bytes)
    if kind == "jsonl" and not _looks_like_one_document(head):
        return _jsonl_records(_open_bytes(path, max_bytes), row_cap)
    if kind in ("jsonl", "json"):
        whole = row_cap or _WHOLE_JSON
        with _open_bytes(path, max_bytes) as f:
            data = f.read(whole + 1)
        if len(data) > whole:  # too big to parse whole: streamed
            return _json_stream_records(path, kind, head, split, max_bytes, row_cap, skip_cap)
        if kind == "json":
            return _json_records(data, path, split, row_cap)
        try:  # a JSON array or pretty-printed object saved as .jsonl
            return _json_document_records(_loads(_decode(data, path)), path, split)
        except (ValueError, UserError):
            return _jsonl_records(io.BytesIO(data), row_cap)
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff")
    if first.lstrip().startswith(("{", "[")):
        raise UserError(f"{path} looks like JSON, not {_KIND_NAMES[kind]}: rename it to .jsonl "
                        "(one object per line) or .json")
    delimiter = "\t" if kind == "tsv" else _csv_delimiter(first)
    return _csv_records(_open_bytes(path, max_bytes), path, delimiter, row_cap)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None


def _parse_line(raw: bytes) -> dict | SkipRow:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return SkipRow("not UTF-8")
    except RecursionError:
        return SkipRow(TOO_DEEP)
    except ValueError:
        return SkipRow("malformed JSON line")
    return row if isinstance(row, dict) else SkipRow("not a JSON object")


def _jsonl_records(stream: BinaryIO, row_cap: int | None = None) -> Iterator[Record]:
    """Rows of a JSON Lines stream, one line at a time (the stream is closed at the end); a line longer
    than ``row_cap`` bytes is skipped without being held in memory."""
    with stream:
        index = 0
        n = 0
        while True:
            raw = stream.readline() if row_cap is None else stream.readline(row_cap + 1)
            if not raw:
                return
            if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            n += 1
            if row_cap is not None and len(raw) > row_cap and not raw.endswith(b"\n"):
                while True:  # the rest of the line, a block at a time
                    rest = stream.readline(1 << 16)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield index, SkipRow(f"row longer than {_size(row_cap)}")
                index += 1
                continue
            if not raw.strip():
                continue
            yield index, _parse_line(raw)
            index += 1


_WS = re.compile(r"[ \t\n\r]*")
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_DECODER = json.JSONDecoder()


def _loads(text: str):
    """json.loads, except that a document too deep for the parser is still read when its too-deep
    parts are items of the top-level list or values (or list items) of the top-level object: those
    become ``SkipRow("too deeply nested")``."""
    try:
        return json.loads(text)
    except RecursionError:
        pass
    i = _WS.match(text).end()
    if text.startswith("[", i):
        value, i = _lenient_array(text, i)
    elif text.startswith("{", i):
        value, i = _lenient_object(text, i)
    else:  # pragma: no cover - scalars cannot be deep
        raise ValueError("too deeply nested")
    i = _WS.match(text, i).end()
    if i != len(text):
        raise json.JSONDecodeError("Extra data", text, i)
    return value


def _lenient_value(text: str, i: int):
    try:
        return _DECODER.raw_decode(text, i)
    except RecursionError:
        return SkipRow(TOO_DEEP), _skip_nested(text, i)


def _lenient_array(text: str, i: int) -> tuple[list, int]:
    out: list = []
    i = _WS.match(text, i + 1).end()
    if text.startswith("]", i):
        return out, i + 1
    while True:
        value, i = _lenient_value(text, i)
        out.append(value)
        i = _WS.match(text, i).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            return out, i + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


def _lenient_object(text: str, i: int) -> tuple[dict, int]:
    out: dict = {}
    i = _WS.match(text, i + 1).end()
    if text.startswith("}", i):
        return out, i + 1
    while True:
        if not text.startswith('"', i):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
        key, i = _DECODER.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if not text.startswith(":", i):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
        i = _WS.match(text, i + 1).end()
        if text.startswith("[", i):
            try:
                value, i = _DECODER.raw_decode(text, i)
            except RecursionError:
                value, i = _lenient_array(text, i)
        else:
            value, i = _lenient_value(text, i)
        out[key] = value
        i = _WS.match(text, i).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("}", i):
            return out, i + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


def _skip_nested(text: str, i: int) -> int:
    """Index just after the array/object starting at ``i`` (brackets inside strings ignored)."""
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(text, i):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    raise json.JSONDecodeError("Unterminated array or object", text, i)


def _json_records(data: bytes, path: Path, split: str, row_cap: int | None = None) -> Iterator[Record]:
    text = _decode(data, path)
    try:
        obj = _loads(text)
    except ValueError as e:
        if _is_json_lines(text):  # JSON Lines saved as .json
            return _jsonl_records(io.BytesIO(data), row_cap)
        raise UserError(f"{path} is not valid JSON ({_one_line(e)}); fix the file or save it as "
                        "JSON Lines") from None
    return _json_document_records(obj, path, split)


class _JsonReader:
    """A JSON text parsed one value at a time from a (capped) byte stream: memory holds the value being
    parsed and a block of text, never the document. ``row_cap``: a value longer than this many
    characters stops the file (a UserError) before more of it is read."""

    BLOCK = 1 << 16

    def __init__(self, path: Path, max_bytes: int | None, row_cap: int | None):
        self.path, self.row_cap = path, row_cap
        self.stream = _open_bytes(path, max_bytes)
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.done, self.eof = "", 0, 0, False

    def __enter__(self) -> "_JsonReader":
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()

    def _more(self, want: int = 0) -> bool:
        """Read at least a block (``want`` characters when more); False at the end of the text."""
        if self.eof:
            return False
        if self.pos > 4 * self.BLOCK:  # drop what was parsed
            self.done += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        data = self.stream.read(max(self.BLOCK, want))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is not UTF-8 text; re-save it as UTF-8") from None
        self.eof = not data
        self.buf += text
        return True

    def fail(self, what: str) -> None:
        raise UserError(f"{self.path} is not valid JSON ({what} at character {self.done + self.pos}); fix the file "
                        "or save it as JSON Lines")

    def peek(self) -> str:
        """The next character that is not whitespace, moving to it ('' at the end)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expecting {char!r}")
        self.pos += 1

    def value(self):
        """The next value (a too deeply nested one as ``SkipRow``)."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                self._skip()
                return SkipRow(TOO_DEEP)
            except json.JSONDecodeError as e:
                pending = len(self.buf) - self.pos
                self._check_length(pending)
                cut = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 64
                if (not cut and not self.eof) or not self._more(pending):
                    self.pos = e.pos
                    self.fail(e.msg)
                continue
            if end == len(self.buf) and not self.eof:  # a number may go on in the next block
                self._more()
                continue
            self._check_length(end - self.pos)
            self.pos = end
            return value

    def _check_length(self, n: int) -> None:
        if self.row_cap is not None and n > self.row_cap:
            raise UserError(f"{self.path} has an item longer than {_size(self.row_cap)}: this reader takes shorter "
                            "rows (or save the data as JSON Lines, where such rows are skipped)")

    def _skip(self) -> None:
        """Move past the array, object or string at the position without parsing it."""
        i, depth, in_string, spanned = self.pos, 0, False, 0
        while True:
            if i >= len(self.buf):
                spanned += i - self.pos
                self._check_length(spanned)
                self.done += len(self.buf)
                self.buf, self.pos, i = "", 0, 0
                if not self._more():
                    self.fail("cut short")
                continue
            if in_string:
                m = _IN_STRING.search(self.buf, i)
                if m is None:
                    i = len(self.buf)
                elif m.group() == "\\":
                    if m.end() >= len(self.buf):  # the escaped character is in the next block
                        spanned += m.start() - self.pos
                        self.done += m.start()
                        self.buf, self.pos, i = self.buf[m.start():], 0, 0
                        if not self._more():
                            self.fail("cut short")
                        continue
                    i = m.end() + 1
                else:
                    in_string, i = False, m.end()
                    if depth == 0:
                        break
                continue
            m = _OUTSIDE_STRING.search(self.buf, i)
            if m is None:
                i = len(self.buf)
                continue
            i = m.end()
            if m.group() == '"':
                in_string = True
            elif m.group() in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    break
        self._check_length(spanned + i - self.pos)
        self.pos = i

    def items(self, first: bool = True) -> Iterator:
        """The items of the array at the position (``first=False``: its "[" and first item were read)."""
        if first:
            self.expect("[")
            if self.peek() == "]":
                self.pos += 1
                return
            yield self.value()
        while True:
            char = self.peek()
            if char == "]":
                self.pos += 1
                return
            if char != ",":
                self.fail("expecting ',' delimiter")
            self.pos += 1
            yield self.value()

    def members(self) -> Iterator[str]:
        """The keys of the object at the position; after each key the position is at its value, which
        the caller reads (`value`, `items`) before asking for the next key."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                self.fail("expecting property name enclosed in double quotes")
            key = self.value()
            self.expect(":")
            yield key
            char = self.peek()
            if char == "}":
                self.pos += 1
                return
            if char != ",":
                self.fail("expecting ',' delimiter")
            self.pos += 1

    def end(self) -> None:
        if self.peek() != "":
            self.fail("extra data")


_IN_STRING = re.compile(r'["\\]')
_OUTSIDE_STRING = re.compile(r'["\[\]{}]')
_ROW_LIST_EXCLUDED = ("messages", "conversations")  # a record's own chat turns, never its rows


def _is_json_value(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _discard(js: _JsonReader) -> None:
    """Read past the value at the position (a list item by item)."""
    if js.peek() == "[":
        for _ in js.items():
            pass
    else:
        js.value()


def _as_row(item) -> "dict | SkipRow":
    return item if isinstance(item, (dict, SkipRow)) else SkipRow("not a JSON object")


def _json_stream_records(path: Path, kind: str, head: bytes, split: str, max_bytes: int | None,
                         row_cap: int | None, skip_cap: int | None) -> Iterator[Record]:
    """The rows of a JSON text too large to parse whole: JSON Lines (the first line is a value of its own
    and more lines follow; also a ``.jsonl`` file whose object does not parse), a top-level array (item by
    item) or the row list of a top-level object."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = [line for line in text.split("\n")[:-1] if line.strip()]  # complete lines only
    if len(lines) >= 2 and _is_json_value(lines[0]):
        return _jsonl_records(_open_bytes(path, max_bytes), row_cap)
    first = text.lstrip(" \t\r\n")[:1]
    if first == "[":
        return _stream_array(path, max_bytes, row_cap)
    if first == "{":
        try:
            key = _row_list_key(path, split, max_bytes, row_cap, skip_cap)
            if key is None:  # no list of rows: the object may be one record
                with _JsonReader(path, max_bytes, row_cap) as js:
                    obj = js.value()
                    js.end()
                return _json_document_records(obj, path, split)
        except UserError:
            if kind != "jsonl":
                raise
            return _jsonl_records(_open_bytes(path, max_bytes), row_cap)
        return _stream_object_list(path, key, max_bytes, row_cap)
    kind = {'"': "string", "t": "true/false value", "f": "true/false value", "n": "null"}.get(first, "number")
    raise UserError(f"{path} holds a JSON {kind}; expected an array of objects or an object with one list field")


def _stream_array(path: Path, max_bytes: int | None, row_cap: int | None) -> Iterator[Record]:
    with _JsonReader(path, max_bytes, row_cap) as js:
        for index, item in enumerate(js.items()):
            yield index, _as_row(item)
        js.end()


def _row_list_key(path: Path, split: str, max_bytes: int | None, row_cap: int | None,
                  skip_cap: int | None) -> str | None:
    """Which member of a large top-level object holds the rows (`_rows_in_object`'s rule; None: none is a
    list of rows), found in a first pass; a list with more items than the rows that could be read is taken
    as the rows at once."""
    look = None if skip_cap is None else skip_cap + skip_cap // 10  # (max_rows + the skip allowance)
    lists: list[str] = []
    with _JsonReader(path, max_bytes, row_cap) as js:
        for key in js.members():
            if not isinstance(key, str) or js.peek() != "[" or key.strip().lower() in _ROW_LIST_EXCLUDED:
                _discard(js)
                continue
            items = js.items()
            first = next(items, None)
            if first is not None and not isinstance(first, (dict, SkipRow)):
                for _ in items:
                    pass
                continue
            lists.append(key)
            for n, _ in enumerate(items, start=2):
                if look is not None and n > look:
                    return key  # more rows than would be read: these are the rows
        js.end()
    if len(lists) == 1:
        return lists[0]
    if split in lists:
        return split
    if not lists:
        return None
    raise UserError(f"{path} has several list fields ({', '.join(lists)}); keep only the one with the rows")


def _stream_object_list(path: Path, key: str, max_bytes: int | None, row_cap: int | None) -> Iterator[Record]:
    with _JsonReader(path, max_bytes, row_cap) as js:
        for name in js.members():
            if name != key or js.peek() != "[":
                _discard(js)
                continue
            for index, item in enumerate(js.items()):
                yield index, _as_row(item)
            return


def _looks_like_one_document(head: bytes) -> bool:
    """The first line of a .jsonl file opens an array, or opens an object it does not close, or
    is an object of no row shape holding a list (like ``{"data": [...]}``)."""
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    first = body.split(b"\n", 1)[0]
    if first.startswith(b"["):
        return True
    if not first.startswith(b"{") or (b"\n" not in body and len(head) == _SNIFF_BYTES):
        return False  # not an object, or a first line too long to judge from the head
    row = _parse_line(first)
    if isinstance(row, SkipRow):
        return True
    return match_format(list(row)) is None and any(isinstance(v, list) for v in row.values())


def _json_document_records(obj, path: Path, split: str) -> Iterator[Record]:
    if isinstance(obj, dict):
        obj = _rows_in_object(obj, path, split)
    if not isinstance(obj, list):
        raise UserError(f"{path} holds a JSON {_json_type(obj)}; expected an array of objects "
                        "or an object with one list field")
    return ((i, r if isinstance(r, (dict, SkipRow)) else SkipRow("not a JSON object"))
            for i, r in enumerate(obj))


def _is_json_lines(text: str) -> bool:
    """One of the first five non-blank lines is a JSON object on its own."""
    lines = (line for line in text.split("\n") if line.strip())
    return any(isinstance(_parse_line(line.encode("utf-8")), dict)
               for line in itertools.islice(lines, 5))


def _json_type(obj) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true/false value"
    if isinstance(obj, (int, float)):
        return "number"
    return "string" if isinstance(obj, str) else type(obj).__name__


def _rows_in_object(obj: dict, path: Path, split: str) -> list:
    """The rows inside a top-level JSON object."""
    # Candidate row lists: lists of objects (or empty), other than a record's own chat turns.
    lists = [k for k, v in obj.items()
             if isinstance(v, list) and (not v or isinstance(v[0], (dict, SkipRow)))
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


def _csv_delimiter(header: str) -> str:
    """',' unless the header line has none and uses ';' (European Excel exports) instead."""
    return ";" if "," not in header and ";" in header else ","


def _csv_records(stream: BinaryIO, path: Path, delimiter: str, row_cap: int | None = None) -> Iterator[Record]:
    """Rows of a CSV/TSV stream read incrementally (the stream is closed at the end); a cell longer
    than ``row_cap`` stops the file with a UserError (the reader cannot find the next row reliably)."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, delimiter=delimiter)

    def next_cells(row_no: int) -> list[str] | None:
        old_limit = csv.field_size_limit(row_cap or 2**31 - 1)  # global: set only while parsing a row
        try:
            return next(reader)
        except StopIteration:
            return None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text (near row {row_no}); re-save it as UTF-8") from None
        except csv.Error as e:
            raise UserError(f"could not parse {path} near row {row_no}: {_one_line(e)}") from None
        finally:
            csv.field_size_limit(old_limit)

    with text:
        header = next_cells(1)
        header = [h.strip() for h in header or []]
        if not any(header):
            raise UserError(f"{path} has an empty header row; the first line must name the columns")
        index = 0
        while (cells := next_cells(index + 2)) is not None:
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                yield index, SkipRow("wrong number of fields")
            else:
                cells = cells + [""] * (len(header) - len(cells))
                yield index, {h: c for h, c in zip(header, cells) if h}
            index += 1
        if index == 0:
            raise UserError(f"{path} has a header but no rows")


def _parquet_records(path: Path, max_bytes: int | None, row_cap: int | None = None) -> Iterator[Record]:
    """Rows of a Parquet file, a few at a time. With ``max_bytes``: the file's size, the uncompressed
    size its metadata declares and the bytes of the values converted so far stay under it. Text
    columns are read dictionary-encoded, so a value repeated on many rows is counted (and a row over
    ``row_cap`` skipped) before it is copied into each row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise UserError(f"{path} is larger than {_size(max_bytes)}: use a smaller file")
    try:
        meta = pq.ParquetFile(path).metadata
        n_rows = meta.num_rows
        declared = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        texts = [meta.schema.column(i).path for i in range(meta.num_columns)
                 if meta.schema.column(i).physical_type == "BYTE_ARRAY"]
        pf = pq.ParquetFile(path, read_dictionary=texts or None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise UserError(f"could not read Parquet file {path}: {_one_line(e)}") from None
    if n_rows == 0:
        raise UserError(f"{path} is empty: it has no rows")
    if max_bytes is not None and declared > max_bytes:
        raise UserError(f"{path} expands beyond {_size(max_bytes)}: use a smaller file")

    def gen():
        index, used = 0, 0
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                sizes = _row_bytes(batch)
                keep = sizes <= row_cap if row_cap is not None else sizes >= 0
                used += int(sizes[keep].sum())
                if max_bytes is not None and used > max_bytes:
                    raise UserError(f"{path} expands beyond {_size(max_bytes)}: use a smaller file")
                rows = (batch if keep.all() else batch.filter(pa.array(keep))).to_pylist()
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged page shows up only when read
                raise UserError(f"could not read Parquet file {path}: {_one_line(e)}") from None
            kept = iter(rows)
            for ok in keep:
                yield index, next(kept) if ok else SkipRow(f"row longer than {_size(row_cap)}")
                index += 1

    return gen()


def _row_bytes(batch):
    """Bytes each row's values hold once converted (texts and binaries by their length, other values by
    their width), as a numpy array; computed on the Arrow arrays, nothing is converted."""
    import numpy as np

    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        total += _value_bytes(column)
    return total


def _value_bytes(arr):
    """`_row_bytes` for one Arrow array (per element)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t, n = arr.type, len(arr)
    if pa.types.is_dictionary(t):
        lengths = _value_bytes(arr.dictionary)
        if len(lengths) == 0:
            return np.zeros(n, dtype=np.int64)
        out = lengths[arr.indices.fill_null(0).to_numpy(zero_copy_only=False)]
        return np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, out)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t):
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        inner = _value_bytes(pc.list_flatten(arr))
        return np.bincount(parents, weights=inner, minlength=n).astype(np.int64)
    if pa.types.is_struct(t):
        total = np.zeros(n, dtype=np.int64)
        for field_array in arr.flatten():
            total += _value_bytes(field_array)
        return total
    try:
        width = max(1, t.bit_width // 8)
    except ValueError:  # a type without a fixed width that is not handled above
        width = 8
    return np.full(n, width, dtype=np.int64)


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


def _disk_records(path: Path, split: str, max_bytes: int | None) -> Iterator[Record]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk; "
                        f"give a data file instead ({SUPPORTED})")
    if max_bytes is not None:
        total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if total > max_bytes:
            raise UserError(f"{path} is larger than {_size(max_bytes)}: use a smaller dataset")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load the dataset folder {path}: {_one_line(e)}") from None
    return _dataset_records(_pick_split(ds, split, str(path)), str(path))


def _is_saved_dataset(path: Path) -> bool:
    return any((path / m).exists() for m in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _dataset_spec_records(spec: DatasetSpec, split: str, max_bytes: int | None) -> Iterator[Record]:
    """Rows of ``spec`` streamed through ``datasets.load_dataset`` (a local folder or the hub)."""
    import datasets

    folder = Path(spec.path).expanduser()
    if folder.is_dir() and max_bytes is not None:
        total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if total > max_bytes:
            raise UserError(f"{folder} is larger than {_size(max_bytes)}: use a smaller dataset")
    split = spec.split or split
    try:
        ds = datasets.load_dataset(str(folder) if folder.is_dir() else spec.path, spec.config, split=split,
                                   streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, not found, missing config, bad split, gated...
        if folder.is_dir():
            raise UserError(f"dataset folder {spec} could not be loaded ({_one_line(e)}); a folder must be a dataset "
                            "saved with save_to_disk or hold data files laid out like a hub dataset") from None
        raise UserError(f"dataset {spec} could not be loaded from the hub or its local cache ({_one_line(e)}); check "
                        "the id, CONFIG (id:config) and SPLIT (id@split), or the network") from None

    def gen():
        rows = itertools.islice(iter(ds), spec.start or 0, spec.stop)
        index = 0
        while True:
            try:
                row = next(rows, None)
            except Exception as e:  # noqa: BLE001 - a stream can fail part-way (network, bad shard)
                raise UserError(f"reading dataset {spec} failed after {index} rows ({_one_line(e)})") from None
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
                           f" ({_one_line(e, 120)})")
                        + "; type them by hand as id:config@split") from None
    return {"configs": configs, "splits": splits}


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
