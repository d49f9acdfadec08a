"""The anywidget class behind :func:`napari_medmamba.notebook.view` (built lazily)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ..annotation import EditLog, LabelHistory
from ..io import Volume
from ._esm import ESM

if TYPE_CHECKING:
    from ..training.finetune import CorrectionExample

INSTALL_HINT = "pip install 'napari-medmamba[notebook]'"

# (centre, width) window presets; "MR auto" is computed from percentiles per volume.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "CT soft tissue": (40.0, 400.0),
    "CT lung": (-600.0, 1500.0),
    "CT bone": (400.0, 1800.0),
}
PLANE_NAMES = ("axial", "coronal", "sagittal")


class NotebookDependencyError(ImportError):
    """anywidget / ipywidgets are missing."""


def require_anywidget() -> Any:
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
        import traitlets  # noqa: F401
    except ImportError as exc:
        raise NotebookDependencyError(
            f"the notebook viewer needs anywidget and ipywidgets ({exc}); install them with: {INSTALL_HINT}"
        ) from exc
    return anywidget


def auto_window(array: np.ndarray, low: float = 1.0, high: float = 99.0, max_samples: int = 2_000_000) -> tuple[float, float]:
    """(centre, width) spanning the ``low``..``high`` percentiles (a strided sample of big arrays)."""
    flat = array.reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    finite = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def window_presets(volume: Volume) -> dict[str, tuple[float, float]]:
    presets = {"MR auto" if volume.modality != "CT" else "auto (1-99%)": auto_window(volume.array)}
    presets.update(CT_PRESETS)
    return presets


def plane_layout(volume: Volume) -> list[dict[str, Any]]:
    """For each displayed plane (axial, coronal, sagittal): which array axes map to screen rows/columns.

    Radiological convention in LPS: axial shows patient left on screen right and posterior
    down; coronal and sagittal show superior up (sagittal: posterior on the right). The
    array axis of each (z, y, x) index is matched to its dominant physical direction, so
    scans stored in any axis-aligned orientation display the same way.
    """
    d = volume.geometry.direction_matrix  # columns: physical direction of index x, y, z
    # physical axis (0=x L, 1=y P, 2=z S) and sign for each array axis (z, y, x)
    dom: dict[int, tuple[int, float]] = {}
    for arr_axis, idx_axis in ((0, 2), (1, 1), (2, 0)):
        col = d[:, idx_axis]
        phys = int(np.argmax(np.abs(col)))
        dom[arr_axis] = (phys, float(np.sign(col[phys]) or 1.0))
    if sorted(p for p, _ in dom.values()) != [0, 1, 2]:  # degenerate / very oblique: use array order
        dom = {0: (2, 1.0), 1: (1, 1.0), 2: (0, 1.0)}
    arr_of = {phys: (arr, sign) for arr, (phys, sign) in dom.items()}
    spacing = volume.spacing_zyx
    shape = volume.shape
    # (normal physical axis, row physical axis, row direction on screen-down, col physical axis, col dir right)
    specs = [(2, 1, +1, 0, +1), (1, 2, -1, 0, +1), (0, 2, -1, 1, +1)]
    planes = []
    for normal_p, row_p, row_dir, col_p, col_dir in specs:
        n_arr = arr_of[normal_p][0]
        r_arr, r_sign = arr_of[row_p]
        c_arr, c_sign = arr_of[col_p]
        planes.append({
            "normal": n_arr,
            "row_axis": r_arr,
            "col_axis": c_arr,
            "row_flip": bool(r_sign * row_dir < 0),
            "col_flip": bool(c_sign * col_dir < 0),
            "rows": shape[r_arr],
            "cols": shape[c_arr],
            "row_mm": spacing[r_arr],
            "col_mm": spacing[c_arr],
        })
    return planes


def extract_plane(array: np.ndarray, plane: dict[str, Any], index: int) -> np.ndarray:
    """The 2D slice of ``array`` at ``index`` along the plane's normal, in display orientation."""
    sl: list[Any] = [slice(None)] * 3
    sl[plane["normal"]] = int(index)
    two_d = array[tuple(sl)]
    remaining = [a for a in range(3) if a != plane["normal"]]
    if remaining.index(plane["row_axis"]) != 0:
        two_d = two_d.T
    if plane["row_flip"]:
        two_d = two_d[::-1, :]
    if plane["col_flip"]:
        two_d = two_d[:, ::-1]
    return two_d


def _hex(color: Any) -> str:
    if isinstance(color, str):
        return color if color.startswith("#") else "#" + color
    rgb = [int(round(float(c) * 255)) if float(c) <= 1.0 else int(c) for c in list(color)[:3]]
    return "#" + "".join(f"{c:02x}" for c in rgb)


@lru_cache(maxsize=1)
def widget_class() -> type:
    """Build the ``VolumeViewer`` anywidget class (imports anywidget on first use)."""
    anywidget = require_anywidget()
    import traitlets as t

    class VolumeViewer(anywidget.AnyWidget):
        """Three orthogonal planes of a volume with a label overlay you can paint on.

        ``labels`` is the numpy label map (edited in place); ``history`` the
        :class:`~napari_medmamba.annotation.LabelHistory` every browser edit goes through;
        ``edit_log`` its :class:`~napari_medmamba.annotation.EditLog`.
        """

        _esm = ESM
        shape = t.List(t.Int()).tag(sync=True)
        spacing_zyx = t.List(t.Float()).tag(sync=True)
        index_to_lps = t.List(t.List(t.Float())).tag(sync=True)
        planes = t.List(t.Dict()).tag(sync=True)
        position = t.List(t.Int()).tag(sync=True)
        img_0 = t.Bytes(b"").tag(sync=True)
        img_1 = t.Bytes(b"").tag(sync=True)
        img_2 = t.Bytes(b"").tag(sync=True)
        lab_0 = t.Bytes(b"").tag(sync=True)
        lab_1 = t.Bytes(b"").tag(sync=True)
        lab_2 = t.Bytes(b"").tag(sync=True)
        label_dtype = t.Unicode("uint16").tag(sync=True)
        window_center = t.Float(0.0).tag(sync=True)
        window_width = t.Float(1.0).tag(sync=True)
        preset = t.Unicode("").tag(sync=True)
        presets = t.Dict().tag(sync=True)
        opacity = t.Float(0.5).tag(sync=True)
        label_names = t.Dict().tag(sync=True)
        label_colors = t.Dict().tag(sync=True)
        tool = t.Unicode("navigate").tag(sync=True)
        active_label = t.Int(1).tag(sync=True)
        brush_radius = t.Int(2).tag(sync=True)
        can_undo = t.Bool(False).tag(sync=True)
        can_redo = t.Bool(False).tag(sync=True)
        edit_count = t.Int(0).tag(sync=True)
        display_size = t.Int(300).tag(sync=True)

        def __init__(self, volume: Volume, labels: np.ndarray, history: LabelHistory,
                     label_names: dict[int, str], label_colors: dict[int, str], **kwargs: Any) -> None:
            self.volume = volume
            self.history = history
            self._planes = plane_layout(volume)
            presets = window_presets(volume)
            first = next(iter(presets)) if volume.modality != "CT" else "CT soft tissue"
            center, width = presets[first]
            state = dict(
                shape=list(volume.shape),
                spacing_zyx=[float(s) for s in volume.spacing_zyx],
                index_to_lps=volume.geometry.index_to_physical_matrix().tolist(),
                planes=self._planes,
                position=[s // 2 for s in volume.shape],
                label_dtype="uint32" if labels.dtype.itemsize > 2 else "uint16",
                presets={k: [float(c), float(w)] for k, (c, w) in presets.items()},
                preset=first, window_center=float(center), window_width=float(width),
                label_names={str(k): v for k, v in label_names.items()},
                label_colors={str(k): v for k, v in label_colors.items()},
                active_label=min((k for k in label_names if k > 0), default=1),
            )
            state.update(kwargs)
            super().__init__(**state)
            with self.hold_sync():
                self._send_slices(images=True)
            self.observe(self._on_position, names="position")
            self.on_msg(self._on_custom_msg)

        # ---- public --------------------------------------------------------------------
        @property
        def labels(self) -> np.ndarray:
            return self.history.labels

        @property
        def edit_log(self) -> EditLog:
            return self.history.edit_log

        def handle_message(self, content: dict[str, Any], buffers: list[Any] | None = None) -> Any:
            """Apply one front-end message (``paint`` / ``undo`` / ``redo``); what the browser sends.

            ``paint``: ``{"type": "paint", "kind": "paint"|"erase", "value": int, "plane": 0..2}``
            with ``buffers[0]`` little-endian uint32 flat (z, y, x) indices (or ``"indices"`` in
            the content), optionally ``buffers[1]`` (or ``"values"``) per-index label values.
            Returns the history entry (None when nothing changed).
            """
            kind = content.get("type")
            if kind == "undo":
                entry = self.history.undo()
            elif kind == "redo":
                entry = self.history.redo()
            elif kind == "paint":
                if buffers:
                    idx = np.frombuffer(bytes(buffers[0]), dtype="<u4").astype(np.int64)
                else:
                    idx = np.asarray(content.get("indices", []), dtype=np.int64).reshape(-1)
                if idx.size and (idx.min() < 0 or idx.max() >= self.labels.size):
                    raise ValueError(f"paint indices outside the label map of {self.labels.size} voxels")
                if buffers and len(buffers) > 1:
                    values: Any = np.frombuffer(bytes(buffers[1]), dtype="<u4").astype(self.labels.dtype)
                elif "values" in content:
                    values = np.asarray(content["values"]).astype(self.labels.dtype)
                else:
                    values = int(content.get("value", 0))
                edit_kind = "erase" if content.get("kind") == "erase" else "paint"
                axis = self._planes[int(content.get("plane", 0))]["normal"]
                entry = self.history.apply(edit_kind, values, indices=idx, axis=axis)
            else:
                raise ValueError(f"unknown message type {kind!r}")
            return entry

        def correction_example(self) -> CorrectionExample:
            """The scan, a copy of the labels and a snapshot of the edit log, ready for
            :func:`~napari_medmamba.training.finetune.finetune` (it learns only from the reviewed slices
            and edited voxels the log records)."""
            from ..training.finetune import CorrectionExample

            log = EditLog.from_bytes(self.edit_log.to_bytes())
            return CorrectionExample(self.volume, self.labels.copy(), log)

        def resegment(self, model: Any, *, keep_confirmed: bool = True, device: str = "auto",
                      mode: str = "accurate") -> Any:
            """Segment the scan again with ``model`` (a registry name or ModelSpec, e.g. a fine-tuned one) and
            write the result into ``labels`` as one undoable step; with ``keep_confirmed`` every voxel of a
            reviewed slice and every edited voxel keeps the user's label. Returns the SegmentationResult
            (also kept as ``widget.result``)."""
            from ..inference import segment

            result = segment(self.volume, model, device=device, mode=mode)
            with self.history.lock:
                keep = self.edit_log.reviewed_mask() if keep_confirmed else None
                self.history.apply("model_run", np.asarray(result.labels.array),
                                   mask=None if keep is None else ~keep)
            self.result = result
            return result

        def undo(self) -> Any:
            return self.history.undo()

        def redo(self) -> Any:
            return self.history.redo()

        def refresh_labels(self) -> None:
            """Resend the visible label slices (call after changing ``labels`` from Python)."""
            with self.hold_sync():
                self._send_slices(images=False)
                self.can_undo = self.history.can_undo
                self.can_redo = self.history.can_redo
                self.edit_count = self.history.version

        def slice_payload_bytes(self) -> int:
            """Bytes of image/label slice data currently synced to the browser."""
            return sum(len(getattr(self, f"{k}_{p}")) for k in ("img", "lab") for p in range(3))

        # ---- internals -----------------------------------------------------------------
        def _plane_bytes(self, p: int) -> tuple[bytes, bytes]:
            plane, index = self._planes[p], self.position[self._planes[p]["normal"]]
            img = np.ascontiguousarray(extract_plane(self.volume.array, plane, index), dtype="<f4")
            lab_dtype = "<u4" if self.label_dtype == "uint32" else "<u2"
            lab = np.ascontiguousarray(extract_plane(self.labels, plane, index), dtype=lab_dtype)
            return img.tobytes(), lab.tobytes()

        def _send_slices(self, images: bool, planes: tuple[int, ...] = (0, 1, 2)) -> None:
            for p in planes:
                img, lab = self._plane_bytes(p)
                if images:
                    setattr(self, f"img_{p}", img)
                setattr(self, f"lab_{p}", lab)

        def _on_position(self, change: dict[str, Any]) -> None:
            old, new = change["old"] or [None] * 3, change["new"]
            moved = tuple(p for p in range(3) if old[self._planes[p]["normal"]] != new[self._planes[p]["normal"]])
            with self.hold_sync():
                self._send_slices(images=True, planes=moved)

        def _on_custom_msg(self, _widget: Any, content: dict[str, Any], buffers: list[Any]) -> None:
            try:
                self.handle_message(content, buffers)
            except Exception as exc:  # keep the comm alive; show the problem in the widget
                self.log.warning("napari-medmamba viewer: %s", exc)

    return VolumeViewer


class _NotifyingHistory(LabelHistory):
    """A LabelHistory that tells the widget after apply / undo / redo, so ``widget.history.undo()``
    also refreshes what the browser shows."""

    listeners: list[Any]

    def _notify(self, result: Any) -> Any:
        for fn in getattr(self, "listeners", []):
            fn()
        return result

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        return self._notify(super().apply(*args, **kwargs))

    def record_applied(self, *args: Any, **kwargs: Any) -> Any:
        return self._notify(super().record_applied(*args, **kwargs))

    def undo(self) -> Any:
        return self._notify(super().undo())

    def redo(self) -> Any:
        return self._notify(super().redo())


def make_viewer(volume: Volume, labels: np.ndarray | Volume | None, label_names: Any, label_colors: Any,
                edit_log: EditLog | None, **kwargs: Any) -> Any:
    cls = widget_class()
    if isinstance(labels, Volume):
        labels = labels.array
    if labels is None:
        labels = np.zeros(volume.shape, dtype=np.uint8)
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the volume {volume.shape}")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if not labels.flags.c_contiguous or not labels.flags.writeable:
        labels = np.ascontiguousarray(labels).copy()
    present = [int(v) for v in np.unique(labels) if v != 0]
    if label_names is None:
        names: dict[int, str] = {v: f"label {v}" for v in (present or [1])}
    elif isinstance(label_names, dict):
        names = {int(k): str(v) for k, v in label_names.items()}
    else:
        names = {i: str(n) for i, n in enumerate(label_names)}
    names = {k: v for k, v in names.items() if k != 0}
    for v in present:
        names.setdefault(v, f"label {v}")
    colors: dict[int, str] = {}
    if label_colors is not None:
        items = label_colors.items() if isinstance(label_colors, dict) else enumerate(label_colors)
        colors = {int(k): _hex(c) for k, c in items if int(k) != 0}
    history = _NotifyingHistory(labels, edit_log)
    widget = cls(volume, labels, history, names, colors, **kwargs)
    history.listeners = [widget.refresh_labels]
    return widget
