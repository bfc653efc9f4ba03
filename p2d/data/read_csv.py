"""CSV and TSV: a header row, then one row per record, streamed.

Cells are text (empty cells are empty); quoted cells may span lines; ``;`` is the delimiter when the
header has no ``,`` (`csv_delimiter`). A row with more cells than the header is skipped ("wrong number
of fields"); a cell longer than ``row_cap`` stops the file with a UserError.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import BinaryIO, Iterator

from p2d.data.formats import Record, SkipRow
from p2d.errors import UserError, one_line


def csv_delimiter(header: str) -> str:
    """',' unless the header line has none and uses ';' (European Excel exports) instead."""
    return ";" if "," not in header and ";" in header else ","


def csv_records(stream: BinaryIO, path: Path, delimiter: str, row_cap: int | None = None) -> Iterator[Record]:
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
            raise UserError(f"could not parse {path} near row {row_no}: {one_line(e)}") from None
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
