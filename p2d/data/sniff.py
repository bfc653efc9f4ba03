"""What a data file is before it is read: its kind by name, a look at its first bytes, and byte
streams that never read past a cap.

- `file_kind`: ``jsonl`` / ``json`` / ``csv`` / ``tsv`` / ``parquet`` from the suffixes (``.gz`` allowed
  for the text kinds; ``.parquet.gz`` is not supported);
- `sniff`: the first `SNIFF_BYTES` of a text file (decompressed), after refusing empty files, ZIP/Excel,
  Parquet, SQLite, gzip data without ``.gz``, UTF-16 and binary files with a one-line UserError;
- `open_bytes`: a buffered stream over a file or its gzip decompression that raises a UserError
  (instead of reading on) once ``max_bytes`` are used, so a gzip bomb stops at the cap;
- `decode_text` and `size_text`: UTF-8 text of bytes and byte counts for messages.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import BinaryIO

from p2d.errors import UserError, one_line

SUPPORTED = (".jsonl, .json, .csv, .tsv, .parquet (optionally .gz), a save_to_disk folder or a dataset "
             "ID[:CONFIG][@SPLIT] (hub id or dataset folder)")
SNIFF_BYTES = 8192
KIND_NAMES = {"jsonl": "JSON Lines", "json": "JSON", "csv": "CSV", "tsv": "TSV"}


def file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    if not suffixes:
        return None
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".tsv": "tsv", ".parquet": "parquet"}.get(suffixes[-1])


def size_text(n: int) -> str:
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
            raise UserError(f"could not read {path}: {one_line(e)}") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.cap is not None:
            room = self.cap - self.total
            if room <= 0:
                if self._read(bytearray(1)) == 0:
                    return 0
                grows = "expands beyond" if self.gz else "is larger than"
                raise UserError(f"{self.path} {grows} {size_text(self.cap)}: use a smaller file")
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
                raise UserError(f"{self.path} is not a valid gzip file or is cut short ({one_line(e)}); "
                                "compress it again with gzip or drop the .gz suffix") from None
            raise UserError(f"could not read {self.path}: {one_line(e)}") from None

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


def open_bytes(path: Path, cap: int | None) -> BinaryIO:
    return io.BufferedReader(_CappedReader(path, cap), buffer_size=1 << 16)


def sniff(path: Path, kind: str, cap: int | None) -> bytes:
    """The first bytes of a text file (decompressed), after refusing empty and non-text files."""
    with open_bytes(path, cap) as f:
        head = f.read(SNIFF_BYTES if cap is None else min(SNIFF_BYTES, cap))
    body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    if not body.strip() and len(head) < SNIFF_BYTES:
        raise UserError(f"{path} is empty")
    what = KIND_NAMES[kind]
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
    if len(head) == SNIFF_BYTES:
        text = text[:-3]  # a multi-byte character may be cut at the end
    if not text:
        return False
    bad = sum(1 for ch in text if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v\x1b"))
    return bad > len(text) / 10


def decode_text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
