"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A reader (or a crash at any moment) sees either the old file or the complete new one,
never a half-written file. Temp files are named ``.<name>.tmp-<random>`` so a crash
leaves at most such a file behind, which :func:`remove_stale_temp_files` cleans up.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "remove_stale_temp_files", "fsync_folder"]


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def fsync_folder(folder: Path) -> None:
    """Flush a folder entry to disk (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | PathLike[str],
    data: bytes | Callable[[BinaryIO], None],
    mode: int | None = None,
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    ``mode`` sets the file permissions (e.g. ``0o600``); by default the permissions an
    ordinary new file would get (honouring the umask) are used. The folder must exist.
    Raises ``OSError`` from the failing step; the original ``path`` is then untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=folder)
    tmp = Path(tmp_name)
    try:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_folder(folder)
    return path


def remove_stale_temp_files(path: str | PathLike[str]) -> int:
    """Delete temp files a crashed :func:`atomic_write` of ``path`` left behind; return how many."""
    path = Path(path)
    removed = 0
    if not path.parent.is_dir():
        return 0
    for candidate in path.parent.glob(_temp_prefix(path) + "*"):
        try:
            candidate.unlink()
            removed += 1
        except OSError:
            pass
    return removed
