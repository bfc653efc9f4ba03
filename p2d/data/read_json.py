"""JSON documents: an array of objects, an object with one list of rows, or a single record.

A document up to a size (`p2d.data.loading` decides) is parsed whole (`json_records`, `loads`: items
too deeply nested for the parser become ``SkipRow("too deeply nested")`` instead of failing the file);
a larger one is streamed item by item (`json_stream_records`: `_JsonReader` holds the value being
parsed and a block of text, never the document; the list of rows of a top-level object is found in a
first pass). JSON Lines saved as ``.json`` is read as JSON Lines.
"""

from __future__ import annotations

import codecs
import io
import itertools
import json
import re
from pathlib import Path
from typing import Iterator

from p2d.data.formats import TOO_DEEP, Record, SkipRow, detect_format
from p2d.data.read_jsonl import jsonl_records, parse_line
from p2d.data.sniff import decode_text, open_bytes, size_text
from p2d.errors import UserError, one_line


_WS = re.compile(r"[ \t\n\r]*")


_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


_DECODER = json.JSONDecoder()


def loads(text: str):
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


def json_records(data: bytes, path: Path, split: str, row_cap: int | None = None) -> Iterator[Record]:
    text = decode_text(data, path)
    try:
        obj = loads(text)
    except ValueError as e:
        if _is_json_lines(text):  # JSON Lines saved as .json
            return jsonl_records(io.BytesIO(data), row_cap)
        raise UserError(f"{path} is not valid JSON ({one_line(e)}); fix the file or save it as "
                        "JSON Lines") from None
    return json_document_records(obj, path, split)


class _JsonReader:
    """A JSON text parsed one value at a time from a (capped) byte stream: memory holds the value being
    parsed and a block of text, never the document. ``row_cap``: a value longer than this many
    characters stops the file (a UserError) before more of it is read."""

    BLOCK = 1 << 16

    def __init__(self, path: Path, max_bytes: int | None, row_cap: int | None):
        self.path, self.row_cap = path, row_cap
        self.stream = open_bytes(path, max_bytes)
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
            raise UserError(f"{self.path} has an item longer than {size_text(self.row_cap)}: this reader takes shorter "
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


def json_stream_records(path: Path, kind: str, head: bytes, split: str, max_bytes: int | None,
                         row_cap: int | None, skip_cap: int | None) -> Iterator[Record]:
    """The rows of a JSON text too large to parse whole: JSON Lines (the first line is a value of its own
    and more lines follow; also a ``.jsonl`` file whose object does not parse), a top-level array (item by
    item) or the row list of a top-level object."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = [line for line in text.split("\n")[:-1] if line.strip()]  # complete lines only
    if len(lines) >= 2 and _is_json_value(lines[0]):
        return jsonl_records(open_bytes(path, max_bytes), row_cap)
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
                return json_document_records(obj, path, split)
        except UserError:
            if kind != "jsonl":
                raise
            return jsonl_records(open_bytes(path, max_bytes), row_cap)
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


def json_document_records(obj, path: Path, split: str) -> Iterator[Record]:
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
    return any(isinstance(parse_line(line.encode("utf-8")), dict)
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
             and str(k).strip().lower() not in _ROW_LIST_EXCLUDED]
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
