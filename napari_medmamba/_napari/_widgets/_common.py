"""Helpers shared by the dock widgets: layer <-> Volume, the per-layer session store, notifications.

The widgets are thin: they collect choices, run the Qt-free core (inference, annotation,
export) in a worker thread and show the results. State that must follow a Labels layer
(the segmentation's uncertainty and probabilities, the undo history and edit log) lives
in :data:`SESSIONS`, keyed by the layer object (weakly, so a deleted layer frees it).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QElapsedTimer, QObject, QTimer, Signal

from ...io import Geometry, Volume
from .._layers import METADATA_KEY, geometry_from_attributes

if TYPE_CHECKING:
    from napari.layers import Layer

    from ...annotation import AutosaveSession, LabelHistory

__all__ = [
    "LayerSession",
    "SESSIONS",
    "StallMonitor",
    "layer_attributes",
    "layer_volume",
    "label_colormap",
    "notify",
    "refill_layer_combo",
    "session_for",
    "SCRIBBLES_KEY",
]

SCRIBBLES_KEY = "medmamba_scribbles"
"""Metadata flag of scribble layers: helper layers that the label pickers leave out."""


def refill_layer_combo(combo: Any, layers: Any, kind: type, newest: bool = False) -> str:
    """Fill ``combo`` with the names of ``kind`` layers (scribble layers left out), keeping the
    current choice when it still exists, else the first (or, with ``newest``, the last) layer.
    Signals are blocked while filling; returns the selected name ('' when there is none)."""
    names = [layer.name for layer in layers if isinstance(layer, kind) and not layer.metadata.get(SCRIBBLES_KEY)]
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    elif names:
        combo.setCurrentIndex(len(names) - 1 if newest else 0)
    combo.blockSignals(False)
    return combo.currentText()


def notify(level: str, message: str) -> None:
    """A napari notification (info / warning / error); never raises."""
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(level, show_info)(message)


def layer_attributes(layer: Layer) -> dict[str, Any]:
    """The layer attributes :func:`geometry_from_attributes` needs."""
    return {
        "metadata": layer.metadata,
        "scale": layer.scale,
        "translate": layer.translate,
        "rotate": layer.rotate,
        "shear": layer.shear,
        "affine": layer.affine,
    }


def layer_volume(layer: Layer, array: np.ndarray | None = None) -> Volume:
    """The layer's data as a Volume on its physical grid (geometry, modality, DICOM source kept).

    Raises ``ValueError`` with a readable message for 2D / multi-channel / RGB layers.
    """
    data = layer.data if array is None else array
    if getattr(layer, "multiscale", False):
        data = data[0]
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer {layer.name!r} is an RGB picture; segmentation needs a 3D grey-level scan")
    shape = tuple(int(s) for s in np.shape(data))
    if len(shape) == 2:
        raise ValueError(
            f"layer {layer.name!r} is a 2D image ({shape[0]} x {shape[1]} pixels); "
            "segmentation needs a 3D scan (open a NIfTI/NRRD/MHA file or a DICOM series)"
        )
    if len(shape) != 3:
        raise ValueError(f"layer {layer.name!r} has {len(shape)} dimensions {shape}; a 3D (z, y, x) scan is needed")
    geometry: Geometry = geometry_from_attributes(layer_attributes(layer), shape)
    entry = layer.metadata.get(METADATA_KEY) or {}
    source = entry.get("source")
    return Volume(
        array=np.asarray(data),
        geometry=geometry,
        path=Path(source) if source else None,
        modality=entry.get("modality"),
        dicom=entry.get("dicom"),
    )


def label_colormap(colors: list[str] | tuple[str, ...]) -> Any:
    """A napari DirectLabelColormap: label value i -> ``colors[i]``, background transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    mapping: dict[int | None, Any] = {None: "transparent", 0: "transparent"}
    for value, color in enumerate(colors):
        if value:
            mapping[value] = color
    return DirectLabelColormap(color_dict=mapping)




@dataclass
class LayerSession:
    """What a Labels layer carries beyond its data: segmentation outputs and correction state."""

    label_names: tuple[str, ...] = ()
    label_colors: tuple[str, ...] = ()
    model_name: str | None = None
    uncertainty: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    history: LabelHistory | None = None
    autosave: AutosaveSession | None = None
    edited_slices: list[int] = field(default_factory=list)
    """Axial slices touched by the user's edits, most recent last (no repeats)."""

    def note_edited(self, slices: np.ndarray) -> None:
        for z in (int(s) for s in np.unique(slices)):
            if z in self.edited_slices:
                self.edited_slices.remove(z)
            self.edited_slices.append(z)
        del self.edited_slices[:-32]


SESSIONS: weakref.WeakKeyDictionary[Any, LayerSession] = weakref.WeakKeyDictionary()


def session_for(layer: Layer) -> LayerSession:
    """The layer's session, created from its metadata (names, colours, model) when new."""
    session = SESSIONS.get(layer)
    if session is None:
        entry = (layer.metadata.get(METADATA_KEY) or {}).get("segmentation") or {}
        session = LayerSession(
            label_names=tuple(entry.get("label_names", ())),
            label_colors=tuple(entry.get("label_colors", ())),
            model_name=entry.get("model_name"),
        )
        SESSIONS[layer] = session
    return session


class StallMonitor(QObject):
    """Measures event-loop responsiveness: a 10 ms QTimer records the gap between its ticks.

    ``max_stall_ms`` is the longest time the event loop could not run the timer (gap minus
    the 10 ms period); above ~100 ms a user feels the interface freeze.
    """

    def __init__(self, interval_ms: int = 10, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.interval_ms = interval_ms
        self.gaps_ms: list[float] = []
        self._clock = QElapsedTimer()
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)
        self._last = 0.0
        self.started_at = 0.0

    def start(self) -> None:
        self.gaps_ms = []
        self.started_at = time.perf_counter()
        self._clock.start()
        self._last = 0.0
        self._timer.start()

    def stop(self) -> None:
        if self._timer.isActive():
            self._tick()
            self._timer.stop()

    @property
    def running(self) -> bool:
        return self._timer.isActive()

    def _tick(self) -> None:
        now = float(self._clock.nsecsElapsed()) / 1e6
        self.gaps_ms.append(now - self._last)
        self._last = now

    @property
    def max_stall_ms(self) -> float:
        if not self.gaps_ms:
            return 0.0
        return max(0.0, max(self.gaps_ms) - self.interval_ms)


class ProgressBridge(QObject):
    """Carries (fraction, stage) progress from a worker thread to the UI thread (queued connection)."""

    progress = Signal(float, str)


class BackgroundRunMixin:
    """Cancel and progress for a dock widget running one background job at a time.

    The widget sets ``worker`` (None when idle), ``cancel_event`` (a ``threading.Event`` the job polls),
    ``cancel_button`` and ``progress`` (a 0-1000 progress bar); ``stage_names`` maps the job's stage names
    to the words shown.
    """

    stage_names: dict[str, str] = {}

    @property
    def running(self) -> bool:
        return self.worker is not None  # type: ignore[attr-defined]

    def cancel(self) -> None:
        """Ask the running job to stop (it checks at its next step); nothing is saved."""
        if not self.running:
            return
        self._cancel_requested()
        self.cancel_event.set()  # type: ignore[attr-defined]
        self.cancel_button.setEnabled(False)  # type: ignore[attr-defined]
        self.progress.setFormat("Cancelling… %p%")  # type: ignore[attr-defined]

    def _cancel_requested(self) -> None:
        """Hook: called when Cancel is honoured, before the job is told."""

    def _on_progress(self, fraction: float, stage: str) -> None:
        if not self.running or self.cancel_event.is_set():  # type: ignore[attr-defined]
            return
        self.progress.setValue(int(round(1000 * fraction)))  # type: ignore[attr-defined]
        self.progress.setFormat(f"{self.stage_names.get(stage, stage)} — %p%")  # type: ignore[attr-defined]
