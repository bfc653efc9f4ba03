"""Writing files so that readers never see half of them.

Every output P2D writes goes through these helpers: the content is written to a temporary file (or
folder) next to the destination and renamed over it, so a crash or a kill leaves either the old
version or the new one, never a truncated file. Renames are atomic on POSIX file systems and on
NTFS within one folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from .distributed import Processes
from .errors import UserError

__all__ = ["atomic_write", "write_text", "write_json", "write_jsonl", "atomic_dir", "read_json", "jsonable", "remove"]

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(exc: BaseException, path) -> BaseException:
    """A UserError for a full disk (or a file size limit), else ``exc`` itself."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return UserError(f"could not write {path}: {os.strerror(exc.errno).lower()}; free some disk space or choose "
                         "another folder (what was written before is intact)")
    return exc


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (parents are created). Under several
    processes (`p2d.distributed`) only the main one writes; the others return ``path`` untouched."""
    path = Path(path)
    if not _writes():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        err = _disk_full(exc, path)
        if err is not exc:
            raise err from exc
        raise
    return path


def remove(path) -> None:
    """Delete a file or folder if it exists (missing is fine). Under several processes only the main
    one deletes, as only it writes."""
    path = Path(path)
    if not _writes():
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _writes() -> bool:
    return Processes.current().is_main


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def jsonable(obj):
    """NaN/inf -> None (strict JSON); tuples -> lists; keys -> str; numpy/torch scalars -> numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        try:
            return jsonable(obj.item())
        except (ValueError, TypeError):
            pass
    return obj


def _default(obj):
    """json.dumps fallback for values rows may carry (arrays, dates, bytes, paths...)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return str(obj)


def dumps(obj, indent: int | None = None) -> str:
    return json.dumps(jsonable(obj), indent=indent, ensure_ascii=False, default=_default)


def write_json(path, obj, indent: int = 1) -> Path:
    return write_text(path, dumps(obj, indent=indent) + "\n")


def write_jsonl(path, rows: Iterable) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
    return atomic_write(path, write)


def read_json(path) -> dict | list | None:
    """The parsed file, or None when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextmanager
def atomic_dir(path):
    """``with atomic_dir(out) as tmp:`` fill ``tmp``; on success it replaces ``out`` whole.

    An existing ``out`` is moved aside first and deleted after the rename, so at every moment the
    destination holds either the old folder or the new one. On an exception ``tmp`` is removed and
    ``out`` is left as it was. Under several processes only the main one replaces ``out``; the others
    fill a private temporary folder that is then deleted.
    """
    path = Path(path)
    if not _writes():
        scratch = Path(tempfile.mkdtemp(prefix="p2d-not-main-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _disk_full(exc, path)
        if err is not exc:
            raise err from exc
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
