"""Which voxels and slices the user changed or accepted: the fine-tuning signal.

An :class:`EditLog` keeps, for one label map, the list of edits (time, kind, slices,
voxel count, label values) and two cumulative records: a boolean *edited* voxel mask
and the set of *reviewed* ``(axis, index)`` slices the user accepted. Voxels edited by
the user, and every voxel of a reviewed slice, are the voxels whose labels a human
confirmed: :meth:`EditLog.reviewed_mask` returns them for training.

A ``model_run`` edit replaces labels with predictions: it clears the edited flag of the
voxels it changed and un-reviews the slices it changed, since those labels are no longer
what the user confirmed.

Every change returns an :class:`LogChange` that :meth:`EditLog.revert` undoes exactly
(last first), which :class:`~napari_medmamba.annotation.history.LabelHistory` uses to keep
the log in step with undo/redo. The log holds no image data, paths or patient data;
it serialises to a small ``.npz`` (masks as packed bits, edits as JSON).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_write import atomic_write

__all__ = ["EDIT_KINDS", "Edit", "LogChange", "EditLog", "EditLogError"]

EDIT_KINDS: tuple[str, ...] = (
    "paint",
    "erase",
    "fill",
    "interpolate",
    "scribble",
    "accept_slice",
    "model_run",
)
"""The kinds of edit the log records."""

FORMAT_VERSION = 1


class EditLogError(ValueError):
    """An edit log file could not be read (names the file and the problem)."""


@dataclass(frozen=True)
class Edit:
    """One recorded edit."""

    timestamp: float
    """Seconds since the epoch (UTC)."""
    kind: str
    axis: int
    """The viewing axis the edit was made on (0 = z, 1 = y, 2 = x)."""
    slices: tuple[int, ...]
    """Indices along ``axis`` of the slices the edit touched, ascending."""
    voxels_changed: int
    labels: tuple[int, ...]
    """Label values written by the edit (0 for erasing)."""
    replaced: tuple[int, ...] = ()
    """Label values the edit overwrote."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Edit:
        return cls(
            timestamp=float(data["timestamp"]),
            kind=str(data["kind"]),
            axis=int(data["axis"]),
            slices=tuple(int(s) for s in data["slices"]),
            voxels_changed=int(data["voxels_changed"]),
            labels=tuple(int(v) for v in data["labels"]),
            replaced=tuple(int(v) for v in data.get("replaced", ())),
        )


@dataclass
class LogChange:
    """What one :meth:`EditLog.record` changed, so that it can be reverted exactly."""

    edit: Edit
    indices: np.ndarray
    """Flat voxel indices whose edited flag was set (or cleared, for a model run)."""
    previous_flags: np.ndarray
    """Edited flags of ``indices`` before the change (packed bits)."""
    slices_added: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    slices_removed: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.previous_flags.nbytes) + 64 * (
            len(self.slices_added) + len(self.slices_removed)
        )


def _check_kind(kind: str) -> None:
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")


def compact_indices(indices: np.ndarray, size: int) -> np.ndarray:
    """Flat indices in the smallest unsigned dtype that holds ``size``."""
    dtype = np.uint32 if size <= np.iinfo(np.uint32).max else np.uint64
    return np.asarray(indices).astype(dtype, copy=False).ravel()


class EditLog:
    """Edits, edited voxels and reviewed slices of a label map of shape ``shape`` (z, y, x)."""

    def __init__(self, shape: Iterable[int]) -> None:
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"EditLog needs a 3D shape with positive sizes, got {self.shape}")
        self._edited = np.zeros(self.shape, dtype=bool)
        self._reviewed: set[tuple[int, int]] = set()
        self.edits: list[Edit] = []

    # ---- recording -------------------------------------------------------------------
    def record(
        self,
        kind: str,
        indices: np.ndarray | None = None,
        *,
        labels: Iterable[int] = (),
        replaced: Iterable[int] = (),
        axis: int = 0,
        slices: Iterable[int] | None = None,
        timestamp: float | None = None,
    ) -> LogChange:
        """Record an edit that changed the voxels at flat ``indices`` (C order).

        ``slices`` defaults to the slices along ``axis`` that contain ``indices``.
        ``accept_slice`` edits mark ``slices`` on ``axis`` as reviewed.
        """
        _check_kind(kind)
        self._check_axis(axis)
        size = int(np.prod(self.shape))
        idx = compact_indices(np.empty(0) if indices is None else np.asarray(indices), size)
        if idx.size and (int(idx.max()) >= size):
            raise ValueError(f"voxel index {int(idx.max())} outside a label map of shape {self.shape}")
        if slices is None:
            touched = np.unique(self._axis_coords(idx, axis))
        else:
            touched = np.unique(np.asarray(list(slices), dtype=np.int64))
            if touched.size and (touched.min() < 0 or touched.max() >= self.shape[axis]):
                raise ValueError(f"slice index outside 0..{self.shape[axis] - 1} on axis {axis}")
        edit = Edit(
            timestamp=time.time() if timestamp is None else float(timestamp),
            kind=kind,
            axis=int(axis),
            slices=tuple(int(s) for s in touched),
            voxels_changed=int(idx.size),
            labels=tuple(sorted({int(v) for v in labels})),
            replaced=tuple(sorted({int(v) for v in replaced})),
        )
        flat = self._edited.reshape(-1)
        previous = np.packbits(flat[idx]) if idx.size else np.empty(0, np.uint8)
        added: set[tuple[int, int]] = set()
        removed: set[tuple[int, int]] = set()
        if kind == "model_run":
            flat[idx] = False
            if idx.size and self._reviewed:
                for a in range(3):
                    on_axis = self.reviewed_indices(a)
                    if on_axis:
                        hit = set(np.unique(self._axis_coords(idx, a)).tolist()) & on_axis
                        removed |= {(a, int(i)) for i in hit}
        else:
            flat[idx] = True
            if kind == "accept_slice":
                added = {(int(axis), int(i)) for i in touched} - self._reviewed
        self._reviewed -= removed
        self._reviewed |= added
        self.edits.append(edit)
        return LogChange(edit, idx, previous, frozenset(added), frozenset(removed))

    def accept_slice(self, axis: int, index: int, timestamp: float | None = None) -> LogChange:
        """Mark slice ``index`` on ``axis`` as reviewed (its labels confirmed as they are)."""
        return self.record("accept_slice", None, axis=axis, slices=[index], timestamp=timestamp)

    def revert(self, change: LogChange) -> None:
        """Undo ``change``; it must be the most recent change still applied."""
        if not self.edits or self.edits[-1] is not change.edit:
            raise ValueError("EditLog.revert: changes must be reverted last first")
        flat = self._edited.reshape(-1)
        if change.indices.size:
            flat[change.indices] = np.unpackbits(change.previous_flags, count=change.indices.size).astype(bool)
        self._reviewed -= change.slices_added
        self._reviewed |= change.slices_removed
        self.edits.pop()

    def reapply(self, change: LogChange) -> None:
        """Redo a reverted ``change``."""
        flat = self._edited.reshape(-1)
        flat[change.indices] = change.edit.kind != "model_run"
        self._reviewed -= change.slices_removed
        self._reviewed |= change.slices_added
        self.edits.append(change.edit)

    # ---- queries ---------------------------------------------------------------------
    @property
    def edited_mask(self) -> np.ndarray:
        """Boolean (z, y, x) mask of the voxels the user changed (read-only view)."""
        view = self._edited.view()
        view.flags.writeable = False
        return view

    @property
    def reviewed_slices(self) -> frozenset[tuple[int, int]]:
        """The accepted slices as ``(axis, index)`` pairs."""
        return frozenset(self._reviewed)

    def reviewed_indices(self, axis: int = 0) -> set[int]:
        """Indices of the reviewed slices on ``axis``."""
        self._check_axis(axis)
        return {i for a, i in self._reviewed if a == axis}

    def reviewed_mask(self, shape: Iterable[int] | None = None) -> np.ndarray:
        """Voxels a human confirmed: every voxel of a reviewed slice, or edited by the user."""
        if shape is not None and tuple(int(s) for s in shape) != self.shape:
            raise ValueError(f"EditLog is for shape {self.shape}, not {tuple(shape)}")
        mask = self._edited.copy()
        for axis, index in self._reviewed:
            idx: list[Any] = [slice(None)] * 3
            idx[axis] = index
            mask[tuple(idx)] = True
        return mask

    def summary(self) -> dict[str, Any]:
        """Counts for reports and the export summary (no image data, no identifiers)."""
        by_kind = {kind: 0 for kind in EDIT_KINDS}
        for edit in self.edits:
            by_kind[edit.kind] += 1
        reviewed = self.reviewed_mask()
        user_edits = [e for e in self.edits if e.kind not in ("model_run", "accept_slice")]
        return {
            "shape": list(self.shape),
            "edits": len(self.edits),
            "edits_by_kind": by_kind,
            "voxels_edited": int(self._edited.sum()),
            "voxels_reviewed": int(reviewed.sum()),
            "reviewed_fraction": float(reviewed.mean()),
            "reviewed_slices": {
                name: sorted(self.reviewed_indices(a)) for a, name in enumerate(("axis0", "axis1", "axis2"))
            },
            "labels_edited": sorted({v for e in user_edits for v in e.labels + e.replaced}),
            "first_edit": min((e.timestamp for e in self.edits), default=None),
            "last_edit": max((e.timestamp for e in self.edits), default=None),
        }

    # ---- serialisation ---------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A compressed ``.npz`` holding the packed edited mask and the edits as JSON."""
        meta = {
            "format": "napari-medmamba edit log",
            "version": FORMAT_VERSION,
            "shape": list(self.shape),
            "reviewed": sorted([a, i] for a, i in self._reviewed),
            "edits": [e.to_dict() for e in self.edits],
        }
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            edited_packed=np.packbits(self._edited.reshape(-1)),
            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> EditLog:
        """Inverse of :meth:`to_bytes`; ``source`` names the origin in error messages."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
                packed = npz["edited_packed"]
            if meta.get("format") != "napari-medmamba edit log":
                raise ValueError("not a napari-medmamba edit log")
            if int(meta.get("version", 0)) > FORMAT_VERSION:
                raise ValueError(f"written by a newer version (format {meta['version']})")
            log = cls(meta["shape"])
            size = int(np.prod(log.shape))
            if packed.size != (size + 7) // 8:
                raise ValueError("edited mask size does not match the shape")
            log._edited = np.unpackbits(packed, count=size).astype(bool).reshape(log.shape)
            log._reviewed = {(int(a), int(i)) for a, i in meta["reviewed"]}
            log.edits = [Edit.from_dict(e) for e in meta["edits"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EditLogError(f"cannot read edit log {source}: {exc}") from exc
        return log

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the log to ``path`` (``.npz``) atomically."""
        return atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | PathLike[str]) -> EditLog:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise EditLogError(f"cannot read edit log {str(path)!r}: {exc.strerror or exc}") from exc
        return cls.from_bytes(data, source=repr(str(path)))

    def _axis_coords(self, idx: np.ndarray, axis: int) -> np.ndarray:
        """Coordinate on ``axis`` of each flat index."""
        stride = int(np.prod(self.shape[axis + 1 :]))
        return (idx // stride) % self.shape[axis]

    def _check_axis(self, axis: int) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
