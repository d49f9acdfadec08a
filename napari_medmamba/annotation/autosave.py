"""Crash-safe autosave of a label map and its edit log.

An :class:`AutosaveSession` writes one file, ``autosave.npz`` (labels, edit log and a
small JSON header), atomically: temp file in the same folder, fsync, ``os.replace``. A
crash therefore loses at most the edits since the last save and never leaves a
half-written file in place. Files are owner-only (0o600) in an owner-only folder (0o700).

Where the file goes, for a scan ``key`` (a scan path or any string):

- ``folder=...``: ``<folder>/<hash of key>/autosave.npz``;
- ``beside_scan=True``: ``<scan>.medmamba/autosave.npz`` next to the scan;
- otherwise a per-user cache folder, ``$MEDMAMBA_AUTOSAVE_DIR`` if set, else
  ``~/.cache/napari-medmamba/autosave`` (Linux, or ``$XDG_CACHE_HOME``),
  ``~/Library/Caches/napari-medmamba/autosave`` (macOS) or
  ``%LOCALAPPDATA%\\napari-medmamba\\autosave`` (Windows), then ``<hash of key>/``.

Folder names are hashes so that no scan path (which may hold a patient's name) is
written; the header holds no path or patient data either.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_write import atomic_write, remove_stale_temp_files
from ..user_dirs import user_folder
from .edit_log import EditLog, EditLogError
from .history import LabelHistory

__all__ = [
    "AUTOSAVE_ENV",
    "AutosaveError",
    "AutosaveSession",
    "RecoveryInfo",
    "autosave_folder",
    "default_autosave_root",
    "find_recovery",
    "read_autosave",
]

AUTOSAVE_ENV = "MEDMAMBA_AUTOSAVE_DIR"
AUTOSAVE_FILE = "autosave.npz"
_FORMAT = "napari-medmamba autosave"
_VERSION = 1
_log = logging.getLogger(__name__)


class AutosaveError(OSError):
    """An autosave could not be written or read (names the file and the problem)."""


def default_autosave_root() -> Path:
    """The per-user autosave folder (``$MEDMAMBA_AUTOSAVE_DIR`` overrides it)."""
    return user_folder("cache", "autosave", AUTOSAVE_ENV)


def _key_text(volume_key: str | PathLike[str]) -> str:
    if isinstance(volume_key, PathLike) or os.path.exists(str(volume_key)):
        return str(Path(volume_key).expanduser().resolve())
    return str(volume_key)


def _key_hash(volume_key: str | PathLike[str]) -> str:
    return hashlib.sha256(_key_text(volume_key).encode("utf-8")).hexdigest()[:32]


def autosave_folder(
    volume_key: str | PathLike[str],
    folder: str | PathLike[str] | None = None,
    beside_scan: bool = False,
) -> Path:
    """The folder autosaves of ``volume_key`` go to (see the module docstring)."""
    if beside_scan:
        if folder is not None:
            raise ValueError("give either folder or beside_scan, not both")
        scan = Path(_key_text(volume_key))
        return scan.with_name(scan.name + ".medmamba")
    root = Path(folder).expanduser() if folder is not None else default_autosave_root()
    return root / _key_hash(volume_key)


def _make_private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@dataclass
class RecoveryInfo:
    """An autosave found on disk."""

    path: Path
    labels: np.ndarray
    edit_log: EditLog
    timestamp: float
    """When it was saved, seconds since the epoch."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.timestamp)


def read_autosave(path: str | PathLike[str]) -> RecoveryInfo:
    """Read an ``autosave.npz``; raises :class:`AutosaveError` when it is not a valid one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
            labels = npz["labels"]
            log_bytes = npz["edit_log"].tobytes()
        if meta.get("format") != _FORMAT:
            raise ValueError("not a napari-medmamba autosave")
        if int(meta.get("version", 0)) > _VERSION:
            raise ValueError(f"written by a newer version (format {meta['version']})")
        if list(labels.shape) != list(meta["shape"]):
            raise ValueError("label shape does not match the header")
        edit_log = EditLog.from_bytes(log_bytes, source=repr(str(path)))
        if edit_log.shape != labels.shape:
            raise ValueError("edit log shape does not match the labels")
    except (OSError, ValueError, KeyError, TypeError, EditLogError) as exc:
        raise AutosaveError(f"cannot read autosave {str(path)!r}: {exc}") from exc
    return RecoveryInfo(path=path, labels=labels, edit_log=edit_log, timestamp=float(meta["saved_at"]), meta=meta)


def _try_read(path: Path) -> RecoveryInfo | None:
    if not path.is_file():
        return None
    try:
        return read_autosave(path)
    except AutosaveError as exc:  # keep the file: the user may still want to look at it
        warnings.warn(str(exc), stacklevel=3)
        return None


def find_recovery(
    scan_path: str | PathLike[str],
    folder: str | PathLike[str] | None = None,
) -> RecoveryInfo | None:
    """The newest readable autosave of ``scan_path`` (beside the scan or in ``folder``/the cache)."""
    candidates = [autosave_folder(scan_path, folder) / AUTOSAVE_FILE]
    if Path(_key_text(scan_path)).exists():
        candidates.append(autosave_folder(scan_path, beside_scan=True) / AUTOSAVE_FILE)
    found = [info for info in (_try_read(p) for p in candidates) if info is not None]
    return max(found, key=lambda info: info.timestamp, default=None)


class AutosaveSession:
    """Periodic, atomic autosave of a :class:`LabelHistory` (labels and edit log).

    ``interval_s`` is the time between background saves once :meth:`start` is called;
    nothing is written when the labels did not change since the last save.
    """

    def __init__(
        self,
        volume_key: str | PathLike[str],
        folder: str | PathLike[str] | None = None,
        interval_s: float = 30.0,
        *,
        beside_scan: bool = False,
        history: LabelHistory | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.volume_key = volume_key
        self.folder = autosave_folder(volume_key, folder, beside_scan)
        self.path = self.folder / AUTOSAVE_FILE
        self.interval_s = float(interval_s)
        self.history = history
        self.on_error = on_error
        self.last_error: Exception | None = None
        self.last_saved: float | None = None
        self._saved_version: int | None = None
        self._save_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, history: LabelHistory) -> None:
        """Save this history's labels and edit log from now on."""
        self.history = history
        self._saved_version = None

    # ---- saving ----------------------------------------------------------------------
    def save_now(self, force: bool = False) -> Path | None:
        """Write the autosave now; returns its path, or None when nothing changed."""
        if self.history is None:
            raise AutosaveError("no label map attached to the autosave session (call attach())")
        with self._save_lock:
            labels, log_bytes, version = self.history.snapshot()
            if not force and version == self._saved_version:
                return None
            meta = {
                "format": _FORMAT,
                "version": _VERSION,
                "saved_at": time.time(),
                "key": _key_hash(self.volume_key),
                "shape": list(labels.shape),
                "dtype": str(labels.dtype),
                "history_version": version,
            }

            def write(fh: Any) -> None:
                buffer = io.BytesIO()
                np.savez_compressed(
                    buffer,
                    labels=labels,
                    edit_log=np.frombuffer(log_bytes, dtype=np.uint8),
                    meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                )
                fh.write(buffer.getbuffer())

            try:
                _make_private_folder(self.folder)
                if self._saved_version is None:  # first save of this session: drop a crashed one's temp files
                    remove_stale_temp_files(self.path)
                atomic_write(self.path, write, mode=0o600)
            except OSError as exc:
                raise AutosaveError(
                    f"cannot write autosave {str(self.path)!r}: {exc.strerror or exc}"
                ) from exc
            self._saved_version = version
            self.last_saved = meta["saved_at"]
            return self.path

    # ---- background timer ------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Save every ``interval_s`` seconds in a background thread until :meth:`stop`."""
        if self.running:
            return
        if self.history is None:
            raise AutosaveError("no label map attached to the autosave session (call attach())")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="medmamba-autosave", daemon=True)
        self._thread.start()

    def stop(self, final_save: bool = True) -> None:
        """Stop the timer (and save once more unless ``final_save`` is False)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if final_save and self.history is not None:
            self.save_now()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.save_now()
                self.last_error = None
            except Exception as exc:  # keep autosaving; report the failure
                self.last_error = exc
                _log.warning("autosave failed: %s", exc)
                if self.on_error is not None:
                    self.on_error(exc)

    def __enter__(self) -> AutosaveSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- recovery --------------------------------------------------------------------
    def find_recovery(self) -> RecoveryInfo | None:
        """This session's autosave on disk, if any and readable."""
        return _try_read(self.path)

    def restore(self) -> RecoveryInfo | None:
        """Load this session's autosave and, when a history is attached, put it in place.

        The attached history gets the saved labels and edit log (undo/redo is reset).
        Returns the recovery, or None when there is no readable autosave.
        """
        info = self.find_recovery()
        if info is not None and self.history is not None:
            self.history.reset(info.labels, info.edit_log)
            self._saved_version = self.history.version
        return info

    def clear(self) -> None:
        """Delete this session's autosave (e.g. after the labels were exported)."""
        with self._save_lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            remove_stale_temp_files(self.path)
            try:
                self.folder.rmdir()
            except OSError:
                pass  # not empty (other files of the user) or already gone
            self._saved_version = None
