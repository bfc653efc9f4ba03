"""JSON Lines: one object per line, streamed.

Malformed lines ("malformed JSON line"), lines that are not UTF-8 ("not UTF-8"), not objects ("not a
JSON object") or nested too deeply are skipped as `SkipRow`s; blank lines are not rows; a BOM is
dropped. With ``row_cap`` a longer line is skipped without being held in memory.
`looks_like_one_document` tells a ``.jsonl`` file that holds one JSON document (read as JSON) from one
that holds lines.
"""

from __future__ import annotations

import json
from typing import BinaryIO, Iterator

from p2d.data.formats import TOO_DEEP, Record, SkipRow, match_format
from p2d.data.sniff import SNIFF_BYTES, size_text


def parse_line(raw: bytes) -> dict | SkipRow:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return SkipRow("not UTF-8")
    except RecursionError:
        return SkipRow(TOO_DEEP)
    except ValueError:
        return SkipRow("malformed JSON line")
    return row if isinstance(row, dict) else SkipRow("not a JSON object")


def jsonl_records(stream: BinaryIO, row_cap: int | None = None) -> Iterator[Record]:
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
                yield index, SkipRow(f"row longer than {size_text(row_cap)}")
                index += 1
                continue
            if not raw.strip():
                continue
            yield index, parse_line(raw)
            index += 1


def looks_like_one_document(head: bytes) -> bool:
    """The first line of a .jsonl file opens an array, or opens an object it does not close, or
    is an object of no row shape holding a list (like ``{"data": [...]}``)."""
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    first = body.split(b"\n", 1)[0]
    if first.startswith(b"["):
        return True
    if not first.startswith(b"{") or (b"\n" not in body and len(head) == SNIFF_BYTES):
        return False  # not an object, or a first line too long to judge from the head
    row = parse_line(first)
    if isinstance(row, SkipRow):
        return True
    return match_format(list(row)) is None and any(isinstance(v, list) for v in row.values())
