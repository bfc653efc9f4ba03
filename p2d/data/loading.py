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
- a hub dataset id (``org/name``) via ``datasets.load_dataset(id, split=split)``.

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

Limits (optional, for untrusted input):

- ``max_rows`` (``limit`` is its old name): keep at most this many usable samples; reading stops
  there and `LoadedData.truncated` says whether rows were left unread (skip counts cover the rows
  read; the shape is detected from the first ``min(1000, max_rows)`` rows).
- ``max_bytes``: UserError for a source that needs more bytes read: text files count decompressed
  bytes and never read past the cap (a gzip bomb stops there; a larger JSONL/CSV file is fine when
  ``max_rows`` is reached first; JSON is read whole); Parquet files and ``save_to_disk`` folders
  count their size on disk.  Not applied to hub ids.
"""

from __future__ import annotations

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

SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet (optionally .gz), a save_to_disk folder or a hub id"
MAX_DEPTH = 100  # nesting levels of a row (the row itself is level 1; a chat message is level 3)
TOO_DEEP = "too deeply nested"
SURROGATES_REPLACED = "invalid characters (lone surrogates) replaced with U+FFFD"
_DETECT_ROWS = 1000
_SNIFF_BYTES = 8192
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_KIND_NAMES = {"jsonl": "JSON Lines", "json": "JSON", "csv": "CSV", "tsv": "TSV"}


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
                 max_rows: int | None = None, *, limit: int | None = None) -> LoadedData:
    """Same as `load_data` for rows already in memory (never mutated; each Sample keeps a shallow
    copy of its row)."""
    max_rows = _check_max_rows(max_rows, limit)
    records = ((i, dict(r) if isinstance(r, dict) else SkipRow("not a JSON object"))
               for i, r in enumerate(rows))
    with _one_line_errors():
        return _build(records, source, mapping, max_rows)


def load_data(source: str | os.PathLike, mapping: dict | None = None, split: str = "train",
              max_rows: int | None = None, *, max_bytes: int | None = None,
              limit: int | None = None) -> LoadedData:
    """Load ``source`` (a path or hub id; see the module docstring) into samples.

    mapping: optional column mapping (see `p2d.data.formats`); split: used for DatasetDict folders
    and hub ids; max_rows (alias ``limit``): keep at most this many usable samples; max_bytes:
    refuse sources that need more bytes read (see the module docstring).
    """
    with _one_line_errors():
        return _load_data(source, mapping, split, max_rows, max_bytes, limit)


def _load_data(source, mapping, split, max_rows, max_bytes, limit) -> LoadedData:
    max_rows = _check_max_rows(max_rows, limit)
    if max_bytes is not None and max_bytes < 1:
        raise UserError(f"max_bytes must be at least 1 (got {max_bytes})")
    text = os.fspath(source)
    name = text.strip()
    if not name:
        raise UserError("no data source given; pass a file, a folder or a hub dataset id")
    path = Path(name).expanduser()
    if path.is_dir():
        records = _disk_records(path, split, max_bytes)
    elif path.exists():
        records = _file_records(path, split, max_bytes)
    elif _looks_like_hub_id(name):
        records = _hub_records(name, split)
    else:
        raise UserError(f"file not found: {name}")
    return _build(records, name, mapping, max_rows)


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
           max_rows: int | None) -> LoadedData:
    repaired_rows: set[int] = set()
    records = _checked(iter(records), repaired_rows)
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


def _checked(records: Iterator[Record], repaired: set[int]) -> Iterator[Record]:
    """Rows too deeply nested become SkipRows; rows with lone surrogates are repaired (their
    indices are added to ``repaired``)."""
    for index, row in records:
        if isinstance(row, dict):
            deep, bad_text = _inspect(row)
            if deep:
                row = SkipRow(TOO_DEEP)
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


def _file_records(path: Path, split: str, max_bytes: int | None) -> Iterator[Record]:
    kind = _file_kind(path)
    if kind is None:
        raise UserError(f"unsupported file type '{''.join(path.suffixes) or path.name}' for {path}; "
                        f"use {SUPPORTED}")
    if kind == "parquet":
        return _parquet_records(path, max_bytes)
    head = _sniff(path, kind, max_bytes)
    if kind == "jsonl" and _looks_like_one_document(head):
        with _open_bytes(path, max_bytes) as f:
            data = f.read()
        try:  # a JSON array or pretty-printed object saved as .jsonl
            return _json_document_records(_loads(_decode(data, path)), path, split)
        except (ValueError, UserError):
            return _jsonl_records(io.BytesIO(data))
    if kind == "jsonl":
        return _jsonl_records(_open_bytes(path, max_bytes))
    if kind == "json":
        with _open_bytes(path, max_bytes) as f:
            data = f.read()
        return _json_records(data, path, split)
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff")
    if first.lstrip().startswith(("{", "[")):
        raise UserError(f"{path} looks like JSON, not {_KIND_NAMES[kind]}: rename it to .jsonl "
                        "(one object per line) or .json")
    delimiter = "\t" if kind == "tsv" else _csv_delimiter(first)
    return _csv_records(_open_bytes(path, max_bytes), path, delimiter)


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


def _jsonl_records(stream: BinaryIO) -> Iterator[Record]:
    """Rows of a JSON Lines stream, one line at a time (the stream is closed at the end)."""
    with stream:
        index = 0
        for n, raw in enumerate(stream):
            if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
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


def _json_records(data: bytes, path: Path, split: str) -> Iterator[Record]:
    text = _decode(data, path)
    try:
        obj = _loads(text)
    except ValueError as e:
        if _is_json_lines(text):  # JSON Lines saved as .json
            return _jsonl_records(io.BytesIO(data))
        raise UserError(f"{path} is not valid JSON ({_one_line(e)}); fix the file or save it as "
                        "JSON Lines") from None
    return _json_document_records(obj, path, split)


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


def _csv_records(stream: BinaryIO, path: Path, delimiter: str) -> Iterator[Record]:
    """Rows of a CSV/TSV stream read incrementally (the stream is closed at the end)."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, delimiter=delimiter)

    def next_cells(row_no: int) -> list[str] | None:
        old_limit = csv.field_size_limit(2**31 - 1)  # global: raised only while parsing a row
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


def _parquet_records(path: Path, max_bytes: int | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise UserError(f"{path} is larger than {_size(max_bytes)}: use a smaller file")
    try:
        pf = pq.ParquetFile(path)
        n_rows = pf.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise UserError(f"could not read Parquet file {path}: {_one_line(e)}") from None
    if n_rows == 0:
        raise UserError(f"{path} is empty: it has no rows")

    def gen():
        index = 0
        batches = pf.iter_batches(batch_size=1000)
        while True:
            try:
                batch = next(batches, None)
                rows = [] if batch is None else batch.to_pylist()
            except Exception as e:  # noqa: BLE001 - a damaged page shows up only when read
                raise UserError(f"could not read Parquet file {path}: {_one_line(e)}") from None
            if batch is None:
                return
            for row in rows:
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
