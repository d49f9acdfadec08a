"""Multi-level undo/redo over a label map for any operation, storing sparse diffs.

Each entry keeps only the voxels an operation changed (flat indices, old and new
values), so painting a few voxels of a 500 MB label map costs a few bytes. The history
is bounded by a number of entries and a number of bytes; the oldest entries are dropped
(they stay applied) when either bound is passed. An :class:`EditLog` is updated on
apply, undo and redo so it always describes the labels as they are.

All changes go through a re-entrant lock (:attr:`LabelHistory.lock`) so a background
autosave can take a consistent snapshot (:meth:`LabelHistory.snapshot`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .edit_log import Edit, EditLog, LogChange, compact_indices

__all__ = ["LabelHistory", "HistoryEntry", "Region"]

Region = tuple[slice, ...]
"""A box of the label map given as one slice per axis (step 1)."""


@dataclass
class HistoryEntry:
    """One undoable operation: the voxels it changed and how the log changed."""

    kind: str
    indices: np.ndarray
    old: np.ndarray
    new: np.ndarray
    log_change: LogChange

    @property
    def edit(self) -> Edit:
        return self.log_change.edit

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.old.nbytes + self.new.nbytes) + self.log_change.nbytes


def _region_indices(shape: tuple[int, ...], region: Region, local_flat: np.ndarray) -> np.ndarray:
    """Flat indices in the full array of flat indices ``local_flat`` inside ``region``."""
    starts = [s.start for s in region]
    sizes = [s.stop - s.start for s in region]
    local = np.unravel_index(local_flat, sizes)
    return np.ravel_multi_index(tuple(c + o for c, o in zip(local, starts, strict=True)), shape)


def _as_label_values(values: object, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype``, refusing values the label dtype cannot hold exactly."""
    arr = np.asarray(values)
    if arr.dtype == dtype or arr.size == 0:
        return arr.astype(dtype, copy=False)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"label values must be numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise ValueError("label values must be whole numbers")
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"label values {arr.min()}..{arr.max()} do not fit labels of dtype {np.dtype(dtype)}")
    return arr.astype(dtype)


class LabelHistory:
    """Undo/redo for the label map ``labels`` (changed in place), with an edit log.

    ``max_entries`` and ``max_bytes`` bound the undo stack (the redo stack counts too).
    """

    def __init__(
        self,
        labels: np.ndarray,
        edit_log: EditLog | None = None,
        *,
        max_entries: int = 100,
        max_bytes: int = 256 * 1024**2,
    ) -> None:
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3D (z, y, x), got shape {labels.shape}")
        if not labels.flags.c_contiguous or not labels.flags.writeable:
            raise ValueError("labels must be a writable C-contiguous array (use np.ascontiguousarray)")
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.labels = labels
        self.edit_log = edit_log if edit_log is not None else EditLog(labels.shape)
        if self.edit_log.shape != labels.shape:
            raise ValueError(f"edit log shape {self.edit_log.shape} differs from labels {labels.shape}")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.lock = threading.RLock()
        self.version = 0
        """Increases on every apply, undo and redo (autosave uses it to skip unchanged state)."""
        self._undo: deque[HistoryEntry] = deque()
        self._redo: list[HistoryEntry] = []
        self._flat = labels.reshape(-1)

    # ---- applying --------------------------------------------------------------------
    def apply(
        self,
        kind: str,
        values: np.ndarray | Callable[[np.ndarray], np.ndarray] | int,
        *,
        indices: np.ndarray | tuple[np.ndarray, ...] | None = None,
        region: Region | None = None,
        mask: np.ndarray | None = None,
        axis: int = 0,
        timestamp: float | None = None,
    ) -> HistoryEntry | None:
        """Change labels and record the change; returns the entry, or None if nothing changed.

        - ``indices`` (flat indices, or a tuple of index arrays as from ``np.nonzero``):
          ``values`` (an array or a scalar) are written there.
        - otherwise ``values`` is the new content of ``region`` (default: the whole map),
          or a function that receives a copy of that region and returns its new content.
          ``mask`` (region-shaped) limits the change to where it is True.
        """
        with self.lock:
            if indices is not None:
                if region is not None or mask is not None or callable(values):
                    raise ValueError("give either indices with values, or a region/mask/function")
                flat_idx = self._flat_indices(indices)
                new = np.broadcast_to(_as_label_values(values, self.labels.dtype), flat_idx.shape)
            else:
                region = self._check_region(region)
                current = self.labels[region]
                proposed = values(current.copy()) if callable(values) else values
                proposed = np.broadcast_to(_as_label_values(proposed, self.labels.dtype), current.shape)
                changed = proposed != current
                if mask is not None:
                    changed &= np.broadcast_to(np.asarray(mask, dtype=bool), current.shape)
                local = np.flatnonzero(changed)
                flat_idx = _region_indices(self.labels.shape, region, local)
                new = proposed[changed]
            return self._commit(kind, flat_idx, new, axis, timestamp)

    def record_applied(
        self,
        kind: str,
        indices: np.ndarray | tuple[np.ndarray, ...],
        old_values: np.ndarray,
        *,
        axis: int = 0,
        timestamp: float | None = None,
    ) -> HistoryEntry | None:
        """Record a change already made in ``labels`` (e.g. napari painting in place).

        ``old_values`` are the values at ``indices`` before the change.
        """
        with self.lock:
            flat_idx = self._flat_indices(indices)
            old = np.broadcast_to(np.asarray(old_values, dtype=self.labels.dtype), flat_idx.shape)
            new = self._flat[flat_idx]
            # put the old values back, then apply through the normal path
            self._flat[flat_idx] = old
            return self._commit(kind, flat_idx, new, axis, timestamp)

    def accept_slice(self, axis: int, index: int, timestamp: float | None = None) -> HistoryEntry:
        """Mark a slice as reviewed, as an undoable entry."""
        with self.lock:
            change = self.edit_log.accept_slice(axis, index, timestamp=timestamp)
            empty = np.empty(0, self.labels.dtype)
            entry = HistoryEntry("accept_slice", change.indices, empty, empty, change)
            self._push(entry)
            return entry

    def _commit(
        self, kind: str, flat_idx: np.ndarray, new: np.ndarray, axis: int, timestamp: float | None
    ) -> HistoryEntry | None:
        if flat_idx.size:
            # the last write wins for repeated indices, as in numpy assignment
            order = np.unique(flat_idx[::-1], return_index=True)[1]
            keep = flat_idx.size - 1 - order
            flat_idx, new = flat_idx[keep], np.asarray(new)[keep]
        old = self._flat[flat_idx]
        changed = old != new
        flat_idx, old, new = flat_idx[changed], old[changed], np.array(new[changed], dtype=self.labels.dtype)
        if flat_idx.size == 0:
            return None
        idx = compact_indices(flat_idx, self.labels.size)
        change = self.edit_log.record(
            kind,
            idx,
            labels=np.unique(new).tolist(),
            replaced=np.unique(old).tolist(),
            axis=axis,
            timestamp=timestamp,
        )
        self._flat[idx] = new
        entry = HistoryEntry(kind, idx, old, new, change)
        self._push(entry)
        return entry

    def _push(self, entry: HistoryEntry) -> None:
        self._redo.clear()
        self._undo.append(entry)
        self.version += 1
        self._enforce_bounds()

    def _enforce_bounds(self) -> None:
        while self._undo and (len(self._undo) > self.max_entries or self.nbytes > self.max_bytes):
            self._undo.popleft()  # stays applied; can no longer be undone

    # ---- undo / redo -----------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def nbytes(self) -> int:
        """Memory held by the undo and redo stacks."""
        return sum(e.nbytes for e in self._undo) + sum(e.nbytes for e in self._redo)

    def __len__(self) -> int:
        return len(self._undo)

    def undo(self) -> HistoryEntry | None:
        """Revert the latest entry; returns it, or None when there is nothing to undo."""
        with self.lock:
            if not self._undo:
                return None
            entry = self._undo.pop()
            self._flat[entry.indices] = entry.old
            self.edit_log.revert(entry.log_change)
            self._redo.append(entry)
            self.version += 1
            return entry

    def redo(self) -> HistoryEntry | None:
        """Re-apply the latest undone entry; returns it, or None when there is nothing to redo."""
        with self.lock:
            if not self._redo:
                return None
            entry = self._redo.pop()
            self._flat[entry.indices] = entry.new
            self.edit_log.reapply(entry.log_change)
            self._undo.append(entry)
            self.version += 1
            self._enforce_bounds_keep_redo()
            return entry

    def _enforce_bounds_keep_redo(self) -> None:
        while len(self._undo) > 1 and (len(self._undo) > self.max_entries or self.nbytes > self.max_bytes):
            self._undo.popleft()

    def clear(self) -> None:
        """Forget undo/redo entries (the labels and the edit log stay as they are)."""
        with self.lock:
            self._undo.clear()
            self._redo.clear()

    def reset(self, labels: np.ndarray, edit_log: EditLog | None = None) -> None:
        """Replace the labels (copied in place) and the edit log, forgetting undo/redo.

        Used to restore an autosave; ``labels`` must have the shape of the map.
        """
        with self.lock:
            if labels.shape != self.labels.shape:
                raise ValueError(f"labels of shape {labels.shape} do not fit the map {self.labels.shape}")
            log = edit_log if edit_log is not None else EditLog(self.labels.shape)
            if log.shape != self.labels.shape:
                raise ValueError(f"edit log shape {log.shape} differs from labels {self.labels.shape}")
            self.labels[...] = _as_label_values(labels, self.labels.dtype)
            self.edit_log = log
            self.clear()
            self.version += 1

    def snapshot(self) -> tuple[np.ndarray, bytes, int]:
        """A consistent copy of (labels, serialised edit log, version), taken under the lock."""
        with self.lock:
            return self.labels.copy(), self.edit_log.to_bytes(), self.version

    # ---- helpers ---------------------------------------------------------------------
    def _flat_indices(self, indices: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        if isinstance(indices, tuple):
            flat = np.ravel_multi_index(tuple(np.asarray(i) for i in indices), self.labels.shape)
        else:
            flat = np.asarray(indices).ravel()
            if flat.size and (flat.min() < 0 or flat.max() >= self.labels.size):
                raise ValueError(f"flat index outside a label map of {self.labels.size} voxels")
        return flat.astype(np.int64, copy=False)

    def _check_region(self, region: Region | None) -> Region:
        if region is None:
            return tuple(slice(0, n) for n in self.labels.shape)
        if len(region) != 3:
            raise ValueError("region needs one slice per axis (z, y, x)")
        out: list[slice] = []
        for s, n in zip(region, self.labels.shape, strict=True):
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError("region slices must have step 1")
            out.append(slice(start, max(start, stop)))
        return tuple(out)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"LabelHistory(undo={len(self._undo)}, redo={len(self._redo)}, bytes={self.nbytes})"
