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

This module reads a source through the reader of its kind (`p2d.data.read_jsonl`, `read_json`,
`read_csv`, `read_parquet`, `read_datasets`; `p2d.data.sniff` tells the kind and refuses what is no
data) and builds the samples from the rows they yield: the shape detection, the column mapping, the
skip and repair accounting and the caps below.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

from p2d.data.formats import (
    TOO_DEEP,
    Record,
    Sample,
    SkipRow,
    check_mapping,
    detect_format,
    mapping_has_content,
    row_shape,
    row_to_sample,
    shape_conflict,
)
from p2d.data.read_csv import csv_delimiter, csv_records
from p2d.data.read_datasets import dataset_spec_records, disk_records, is_saved_dataset, parse_dataset_spec
from p2d.data.read_json import json_document_records, json_records, json_stream_records, loads
from p2d.data.read_jsonl import jsonl_records, looks_like_one_document
from p2d.data.read_parquet import parquet_records
from p2d.data.sniff import KIND_NAMES, SUPPORTED, decode_text, file_kind, open_bytes, sniff
from p2d.errors import UserError

# pyarrow (Parquet) and datasets (save_to_disk folders, hub ids) are imported only for the sources that need them

MAX_DEPTH = 100  # nesting levels of a row (the row itself is level 1; a chat message is level 3)
SURROGATES_REPLACED = "invalid characters (lone surrogates) replaced with U+FFFD"
_DETECT_ROWS = 1000
_SURROGATE = re.compile("[\ud800-\udfff]")
_ROW_BYTES = 1 << 20        # the least row cap when max_field_chars is set (a row may hold several fields)
_WHOLE_JSON = 8 << 20       # without max_field_chars: JSON documents up to this are parsed whole


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
    if path.is_dir() and is_saved_dataset(path):
        records = disk_records(path, split, max_bytes)
    elif path.exists() and not path.is_dir():
        records = _file_records(path, split, max_bytes, _row_cap(max_field_chars), _skip_cap(max_rows))
    elif (spec := parse_dataset_spec(name)) is not None:
        records = dataset_spec_records(spec, split, max_bytes)
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


# --- files ------------------------------------------------------------------------


def _file_records(path: Path, split: str, max_bytes: int | None, row_cap: int | None = None,
                  skip_cap: int | None = None) -> Iterator[Record]:
    kind = file_kind(path)
    if kind is None:
        raise UserError(f"unsupported file type '{''.join(path.suffixes) or path.name}' for {path}; "
                        f"use {SUPPORTED}")
    if kind == "parquet":
        return parquet_records(path, max_bytes, row_cap)
    head = sniff(path, kind, max_bytes)
    if kind == "jsonl" and not looks_like_one_document(head):
        return jsonl_records(open_bytes(path, max_bytes), row_cap)
    if kind in ("jsonl", "json"):
        whole = row_cap or _WHOLE_JSON
        with open_bytes(path, max_bytes) as f:
            data = f.read(whole + 1)
        if len(data) > whole:  # too big to parse whole: streamed
            return json_stream_records(path, kind, head, split, max_bytes, row_cap, skip_cap)
        if kind == "json":
            return json_records(data, path, split, row_cap)
        try:  # a JSON array or pretty-printed object saved as .jsonl
            return json_document_records(loads(decode_text(data, path)), path, split)
        except (ValueError, UserError):
            return jsonl_records(io.BytesIO(data), row_cap)
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff")
    if first.lstrip().startswith(("{", "[")):
        raise UserError(f"{path} looks like JSON, not {KIND_NAMES[kind]}: rename it to .jsonl "
                        "(one object per line) or .json")
    delimiter = "\t" if kind == "tsv" else csv_delimiter(first)
    return csv_records(open_bytes(path, max_bytes), path, delimiter, row_cap)


