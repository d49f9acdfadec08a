"""Segment dock widget: pick a scan and a model, run it in a worker thread, get a Labels layer.

The model never runs on the UI thread: :func:`napari_medmamba.inference.segment` runs in a
napari worker (a QThread); its progress callback reaches the progress bar through a
queued Qt signal, and Cancel sets a ``threading.Event`` the engine checks between tiles
and inside the network's forward pass.
"""

from __future__ import annotations

import html
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...inference import (
    Postprocess,
    SegmentationCancelled,
    SegmentationInputError,
    SegmentationResult,
    describe_postprocess,
    postprocess_for,
    recommended_postprocess,
    segment,
)
from ...inference.planner import choose_device
from ...io import Volume
from ...models import default_model_name, get_model_spec, list_models
from ...models.lightm_unet import warm_cpu_kernels
from .._layers import METADATA_KEY, geometry_kwargs, labels_layer_data, volume_metadata
from ._common import (
    BackgroundRunMixin,
    SESSIONS,
    LayerSession,
    ProgressBridge,
    StallMonitor,
    label_colormap,
    layer_volume,
    notify,
    refill_layer_combo,
)

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentWidget", "cleanup_tooltip", "model_summary", "refresh_segment_models"]

LIVE_WIDGETS: weakref.WeakSet[SegmentWidget] = weakref.WeakSet()
"""Open Segment widgets (the Fine-tune widget refreshes their model lists)."""


def refresh_segment_models(select: str | None = None) -> None:
    """Refill the model list of every open Segment widget; select ``select`` when given."""
    for widget in list(LIVE_WIDGETS):
        try:
            widget.refresh_models(select)
        except RuntimeError:  # the Qt object is already deleted
            LIVE_WIDGETS.discard(widget)

DEVICES = {"Auto (GPU if available)": "auto", "CPU": "cpu", "GPU (CUDA)": "cuda"}
MODES = {"Accurate": "accurate", "Fast (coarser grid, less overlap)": "fast"}
MODE_TOOLTIP = ("Accurate: the model's own voxel size, windows overlapping by half.\n"
                "Fast: a 1.5x coarser grid and less overlap, about 2x faster on a CPU for large scans, but much "
                "less accurate\n(measured mean Dice: hippocampus 0.88 -> 0.74, head-and-neck CT 0.71 -> 0.41). "
                "For a quick preview only.")
CLEANUPS = {
    "Recommended for this model": "recommended",
    "None": "none",
    "Largest component, every structure": "largest",
}
"""Clean-up choices (``napari_medmamba.inference.postprocessing.postprocess_for``)."""
STAGE_NAMES = {
    "preprocess": "Preparing scan",
    "inference": "Running model",
    "resample": "Resampling to the scan grid",
    "postprocess": "Cleaning up",
}


def cleanup_tooltip(name: str) -> str:
    """What each Clean-up choice does, organ by organ, for the registered model ``name``."""
    names = get_model_spec(name).contract.label_names
    recommended = recommended_postprocess(name)
    if recommended is None:
        advice = f"Recommended for {name}: no clean-up (every structure is kept as predicted)."
    else:
        kept = set(recommended.largest_component)
        advice = (f"Recommended for {name}: keep only the largest connected piece of "
                  f"{', '.join(names[c] for c in sorted(kept))}; "
                  f"{', '.join(n for c, n in enumerate(names) if c and c not in kept) or 'nothing else'} "
                  "left as predicted (a structure predicted in several pieces, like a spinal cord, "
                  "would lose all but one).")
    return (f"{advice}\nNone: the model's labels as they are.\nLargest component, every structure: keep only "
            "the largest connected piece of each structure; stray blobs elsewhere become background.")


def model_summary(name: str) -> str:
    """One line describing a registered model: modality, dimensionality, labels, weights."""
    spec = get_model_spec(name)
    c = spec.contract
    labels = ", ".join(n for n in c.label_names[1:]) or "none"
    modality = "any modality" if c.modality == "any" else c.modality
    weights = "trained weights" if spec.weights else "no trained weights yet"
    if spec.card.get("finetuned"):
        weights = f"fine-tuned from {spec.card.get('base_model', '?')} on your corrections"
        after = (spec.card.get("dice_after") or {}).get("mean")
        before = (spec.card.get("dice_before") or {}).get("mean")
        if after is not None and before is not None:
            weights += f" (held-back Dice {before:.2f} → {after:.2f})"
    dice = spec.card.get("validation_dice", {}).get("mean_foreground", {}).get("mean")
    if dice is not None:
        weights += f" (validation Dice {dice:.3f})"
    return f"{modality} · {c.spatial_dims}D · labels: {labels} · {weights}"


class SegmentWidget(BackgroundRunMixin, QWidget):
    """Dock widget: scan + model + device + mode -> Run (progress, Cancel) -> Labels layer."""

    stage_names = STAGE_NAMES

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.cancel_event = threading.Event()
        self.monitor = StallMonitor(parent=self)
        self.last_result: SegmentationResult | None = None
        self.last_layer: Any = None
        self.last_outcome: str | None = None
        """'done', 'cancelled' or 'error' for the latest run."""
        self.last_postprocess: Postprocess | None = None
        """The clean-up the latest run asked the engine for (None: none)."""
        self._cancel_requested_at: float | None = None
        self.run_stall_ms: float | None = None
        """Longest event-loop stall (ms) while the latest run was in its worker thread."""
        self.add_result_s: float | None = None
        """Seconds the UI thread spent adding the result layers (napari/vispy layer creation)."""
        self.cancel_latency_s: float | None = None
        self.colormap_ready = warm_label_colormap()
        self.cpu_kernels_ready = warm_cpu_kernels_in_background()
        self._bridge = ProgressBridge()
        self._bridge.progress.connect(self._on_progress)

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The 3D scan to segment (Image layers)")
        self.model_combo = QComboBox()
        _register_stored_models()
        for name in list_models():
            self.model_combo.addItem(name)
        default = default_model_name()
        if default in list_models():
            self.model_combo.setCurrentText(default)
        self.model_card = QLabel()
        self.model_card.setWordWrap(True)
        self.model_card.setStyleSheet("color: #bbbbbb;")
        self.model_card.setMinimumHeight(2 * self.model_card.fontMetrics().height() + 6)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.mode_combo.setToolTip(MODE_TOOLTIP)
        self.cleanup_combo = QComboBox()
        self.cleanup_combo.addItems(list(CLEANUPS))
        self.mirror_check = QCheckBox("Also predict mirrored left-right (2x slower)")
        self.mirror_check.setToolTip("Test-time mirroring: average the prediction with that of the left-right mirror "
                                     "image. Offered for models measured to gain from it (hippocampus: mean Dice "
                                     "0.879 -> 0.882 at twice the time).")

        form = QFormLayout()
        form.addRow("Scan:", self.image_combo)
        form.addRow("Model:", self.model_combo)
        form.addRow("", self.model_card)
        form.addRow("Device:", self.device_combo)
        form.addRow("Mode:", self.mode_combo)
        form.addRow("Clean-up:", self.cleanup_combo)
        form.addRow("Mirroring:", self.mirror_check)

        self.run_button = QPushButton("Run segmentation")
        self.run_button.setStyleSheet("font-weight: bold;")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("Idle")
        self.progress.setTextVisible(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        legend_box = QGroupBox("Labels")
        self.legend = QLabel("Run a model to see its labels.")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        legend_layout = QVBoxLayout(legend_box)
        legend_layout.addWidget(self.legend)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(legend_box)
        layout.addStretch(1)

        self.model_combo.currentTextChanged.connect(self._update_card)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_images)
        events.removed.connect(self._refresh_images)
        self._refresh_images()
        self._update_card(self.model_combo.currentText())
        LIVE_WIDGETS.add(self)

    def refresh_models(self, select: str | None = None) -> None:
        """Refill the model list (fine-tuned models come and go); keep the choice, or select ``select``."""
        names = list_models()
        current = self.model_combo.currentText()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems(names)
        choice = select if select in names else current if current in names else default_model_name()
        if choice in names:
            self.model_combo.setCurrentText(choice)
        self.model_combo.blockSignals(False)
        self._update_card(self.model_combo.currentText())

    # ---- pickers -----------------------------------------------------------------
    def _refresh_images(self, *_: Any) -> None:
        from napari.layers import Image

        refill_layer_combo(self.image_combo, self.viewer.layers, Image)

    def _update_card(self, name: str) -> None:
        if not name:
            self.model_card.setText("No model registered.")
            return
        try:
            self.model_card.setText(model_summary(name))
            self.model_card.setToolTip(get_model_spec(name).description)
            self.cleanup_combo.setToolTip(cleanup_tooltip(name))
            mirrorable = bool(get_model_spec(name).contract.mirror_axes)
            self.mirror_check.setEnabled(mirrorable)
            if not mirrorable:
                self.mirror_check.setChecked(False)
        except KeyError as exc:
            self.model_card.setText(str(exc))

    def selected_image(self) -> Any:
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # ---- running -----------------------------------------------------------------
    def run(self) -> None:
        """Start a segmentation of the selected scan in a worker thread."""
        from napari.qt.threading import create_worker

        if self.running:
            notify("warning", "A segmentation is already running; cancel it first.")
            return
        image = self.selected_image()
        if image is None:
            notify("error", "No scan selected: open a 3D scan (File > Open) and pick it under 'Scan'.")
            return
        model = self.model_combo.currentText()
        if not model:
            notify("error", "No model is registered.")
            return
        try:
            volume = layer_volume(image)
        except ValueError as exc:
            notify("error", f"Cannot segment: {exc}")
            return
        device = DEVICES[self.device_combo.currentText()]
        mode = MODES[self.mode_combo.currentText()]
        mirror = self.mirror_check.isChecked()  # unchecked and disabled for models without mirror_axes
        try:
            postprocess = postprocess_for(CLEANUPS[self.cleanup_combo.currentText()], model)
        except KeyError as exc:
            notify("error", f"Cannot segment: {exc}")
            return
        self.cancel_event = threading.Event()
        self._cancel_requested_at = None
        self.cancel_latency_s = None
        self.last_outcome = None
        self._set_running(True)
        self.progress.setValue(0)
        self.progress.setFormat("Starting… %p%")
        self.status.setText(f"Segmenting {image.name!r} with {model} ({mode}, {device})…")
        self.monitor.start()
        cancel = self.cancel_event
        bridge = self._bridge

        def work() -> tuple[str, Any]:
            # runs in the worker thread: no Qt widgets, no napari layers here
            try:
                result = segment(
                    volume, self._model_argument(model), device=device, mode=mode, postprocess=postprocess,
                    progress=lambda f, s: bridge.progress.emit(float(f), str(s)), cancel=cancel, mirror=mirror,
                )
                return "done", result
            except SegmentationCancelled:
                return "cancelled", None
            except SegmentationInputError as exc:
                return "error", f"The scan cannot be segmented: {exc}"
            except Exception as exc:  # a model or device failure must not crash napari
                return "error", f"Segmentation failed ({type(exc).__name__}): {exc}"

        worker = create_worker(work)
        self.last_postprocess = postprocess
        worker.returned.connect(lambda out, v=volume, n=image.name, m=model: self._on_returned(out, v, n, m))
        worker.errored.connect(lambda exc: self._on_returned(("error", f"Segmentation failed: {exc}"), volume, image.name, model))
        self.worker = worker
        worker.start()

    def _model_argument(self, name: str) -> Any:
        """What ``segment`` gets as its model (the registry name)."""
        return name

    def _cancel_requested(self) -> None:
        self._cancel_requested_at = time.perf_counter()  # the segmentation stops at the next tile or layer

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for combo in (self.image_combo, self.model_combo, self.device_combo, self.mode_combo, self.cleanup_combo):
            combo.setEnabled(not running)

    def _on_returned(self, outcome: tuple[str, Any], volume: Volume, image_name: str, model: str) -> None:
        kind, payload = outcome
        self.run_stall_ms = self.monitor.max_stall_ms  # the event loop while the model ran
        self.worker = None
        self._set_running(False)
        self.last_outcome = kind
        if self._cancel_requested_at is not None:
            self.cancel_latency_s = time.perf_counter() - self._cancel_requested_at
        if kind == "cancelled" or (kind == "done" and self.cancel_event.is_set()):
            self.last_outcome = "cancelled"
            self.progress.setValue(0)
            self.progress.setFormat("Cancelled")
            self.status.setText("Segmentation cancelled; nothing was added.")
            notify("info", f"Segmentation of {image_name!r} cancelled; no layer was added.")
        elif kind == "error":
            self.progress.setFormat("Failed")
            self.status.setText(str(payload))
            notify("error", str(payload))
        else:
            try:
                t0 = time.perf_counter()
                self._add_result(payload, volume, image_name)
                self.add_result_s = time.perf_counter() - t0
            except Exception as exc:  # keep napari alive; say what went wrong
                self.last_outcome = "error"
                notify("error", f"Could not show the segmentation: {type(exc).__name__}: {exc}")
        self.monitor.stop()

    # ---- result ------------------------------------------------------------------
    def _add_result(self, result: SegmentationResult, volume: Volume, image_name: str) -> None:
        self.last_result = result
        name = f"{image_name} {result.model_name}"
        labels = np.ascontiguousarray(result.labels.array)
        data, kwargs, _ = labels_layer_data(labels, like=volume, name=name)
        kwargs["metadata"][METADATA_KEY]["segmentation"] = {
            "label_names": list(result.label_names),
            "label_colors": list(result.label_colors),
            "model_name": result.model_name,
            "mode": result.mode,
            "postprocess": describe_postprocess(self.last_postprocess, result.label_names),
            "device": result.device,
            "warnings": list(result.warnings),
            "timings": dict(result.timings),
        }
        uncertainty = np.asarray(result.uncertainty, dtype=np.float32)
        self.viewer.add_image(
            uncertainty,
            name=f"{name} uncertainty",
            visible=False,
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            metadata=volume_metadata(volume.with_array(uncertainty)),
            **geometry_kwargs(volume.geometry),
        )
        layer = self.viewer.add_labels(data, colormap=label_colormap(result.label_colors), opacity=0.5, **kwargs)
        SESSIONS[layer] = LayerSession(
            label_names=tuple(result.label_names),
            label_colors=tuple(result.label_colors),
            model_name=result.model_name,
            uncertainty=result.uncertainty,
            probabilities=result.probabilities,
        )
        self.last_layer = layer
        self.viewer.layers.selection.active = layer
        self.legend.setText(legend_html(result.label_names, result.label_colors))
        total = result.timings.get("total", 0.0)
        self.progress.setValue(1000)
        self.progress.setFormat("Done — %p%")
        self.status.setText(f"Added {name!r} in {total:.1f} s on {result.device}.")
        for warning in result.warnings:
            notify("warning", warning)
        notify("info", f"Segmentation done: layer {name!r} ({total:.1f} s on {result.device}).")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.cancel()
        super().closeEvent(event)


def _register_stored_models() -> None:
    """Make the user's fine-tuned models (see :mod:`napari_medmamba.training.model_store`) selectable."""
    try:
        from ...training.model_store import register_stored

        register_stored()
    except Exception as exc:  # a broken store must not keep the widget from opening
        notify("warning", f"Fine-tuned models could not be loaded: {exc}")


COLORMAP_READY = threading.Event()
"""Set once napari's label-colour lookup is compiled (see :func:`warm_label_colormap`)."""
CPU_KERNELS_READY = threading.Event()
"""Set once LightM-UNet's CPU inference kernels are compiled or loaded (see :func:`warm_cpu_kernels_in_background`)."""
_warm_lock = threading.Lock()
_warm_started: set[str] = set()


def _warm_once(name: str, ready: threading.Event, work: Callable[[], object]) -> threading.Event:
    """Run ``work`` once per process in a daemon thread named ``name``; ``ready`` is set when it ends. A failure
    is ignored: warming up is only an optimisation (the first real use would do the same work itself)."""
    with _warm_lock:
        if name in _warm_started:
            return ready
        _warm_started.add(name)

    def warm() -> None:
        try:
            work()
        except Exception:
            pass
        finally:
            ready.set()

    threading.Thread(target=warm, name=name, daemon=True).start()
    return ready


def _compile_label_colormap() -> None:
    cmap = label_colormap(("#000000", "#ff0000", "#00ff00"))
    for dtype in (np.uint8, np.uint16):
        cmap.map(np.zeros(4, dtype=dtype))


def warm_label_colormap() -> threading.Event:
    """Compile napari's DirectLabelColormap lookup (numba: ~1-3 s on first use) in a background thread.

    Started when the Segment widget opens, so neither a run nor the display of its result
    pays for it on the UI thread. Returns the event set when done.
    """
    return _warm_once("medmamba-colormap-warmup", COLORMAP_READY, _compile_label_colormap)


def warm_cpu_kernels_in_background() -> threading.Event:
    """Compile (first run after installing: about 10 s on 2 cores) or load the numba kernels of CPU inference in a
    background thread, when the Segment widget opens and no CUDA GPU is present, so the first run does not wait
    for them. Returns the event set when done (at once with a GPU)."""
    if choose_device("auto").type != "cpu":
        CPU_KERNELS_READY.set()
        return CPU_KERNELS_READY
    return _warm_once("medmamba-cpu-kernels-warmup", CPU_KERNELS_READY, warm_cpu_kernels)


def legend_html(names: tuple[str, ...] | list[str], colors: tuple[str, ...] | list[str]) -> str:
    """Rich-text legend: a coloured square and the name of every non-background label."""
    rows = []
    for value, (name, color) in enumerate(zip(names, colors)):
        if value == 0:
            continue
        rows.append(
            f'<span style="color:{html.escape(color)}; font-size:14pt;">&#9632;</span> '
            f"{value}: {html.escape(name)}"
        )
    return "<br>".join(rows) or "No labels."
