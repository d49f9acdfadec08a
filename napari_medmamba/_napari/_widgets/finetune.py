"""Fine-tune dock widget: adapt a model to the user's reviewed / corrected slices, then re-segment.

What is learned from is exactly what the Review & correct widget recorded in the labels layer's
:class:`~napari_medmamba.annotation.EditLog`: every voxel of an axial slice marked reviewed and every
voxel the user edited. :func:`~napari_medmamba.training.finetune.finetune` runs in a worker thread (progress,
Cancel); the fine-tuned model then re-segments the scan in the same worker. Only when both finished is the
model saved to the per-user model store (owner-only files), registered, and selected in the Segment widget;
the new labels go into the labels layer through its :class:`~napari_medmamba.annotation.LabelHistory` as one
undoable ``model_run`` step that leaves every reviewed slice and every edited voxel as the user left it.
Cancel at any point saves nothing and keeps the base model.
"""

from __future__ import annotations

import html
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...annotation import EditLog
from ...inference import SegmentationCancelled, segment
from ...models import get_model_spec, list_models
from .._layers import METADATA_KEY
from ._common import BackgroundRunMixin, ProgressBridge, layer_volume, notify, refill_layer_combo, session_for
from .segment import refresh_segment_models

if TYPE_CHECKING:
    import napari

__all__ = ["FinetuneWidget", "supervision_counts"]

AXIS = 0
TRAIN_MODES = {
    "Decoder + norms (recommended)": "decoder",
    "Full network (slower)": "full",
}
STOP_REASONS = {
    "max_steps": "step limit reached",
    "budget": "time budget used",
    "early_stop": "stopped when the held-back Dice stopped improving",
    "no_trainable_slices": "no slice left to train on",
    "cancelled": "cancelled",
}
TRAIN_SHARE = 0.85
"""Share of the progress bar for training; the rest is the re-segmentation."""
EXPLANATION = (
    "Adapts the model to this scan using <b>only what you confirmed</b> in Review &amp; correct: the axial "
    "slices you marked reviewed and the voxels you corrected. Everything else is ignored. Some of those "
    "slices are held back to measure Dice before → after. Afterwards the new model re-segments the scan; "
    "your reviewed slices and corrected voxels are kept as they are."
)


def supervision_counts(log: EditLog | None) -> tuple[int, int, int, int]:
    """(reviewed slices, corrected slices, corrected voxels, slices to learn from) of an edit log (axis 0)."""
    if log is None:
        return 0, 0, 0, 0
    reviewed = log.reviewed_indices(AXIS)
    edited = log.edited_mask
    corrected = {int(z) for z in np.flatnonzero(edited.any(axis=(1, 2)))}
    return len(reviewed), len(corrected), int(edited.sum()), len(reviewed | corrected)


def _copy_log(log: EditLog) -> EditLog:
    """A snapshot (the user may keep editing while the model trains)."""
    return EditLog.from_bytes(log.to_bytes())


def _import_dynamo_without_triton() -> None:
    """Import ``torch._dynamo`` (the first optimiser of a process does) without loading Triton, on CPU.

    In a napari process on a machine without CUDA, OpenGL is usually Mesa's llvmpipe, which has loaded its
    LLVM; loading Triton's bundled LLVM afterwards crashes the process (a segfault at ``import triton``).
    Triton is useless without CUDA, so torch is told it is absent while ``torch._dynamo`` is imported (torch
    caches that answer); ``sys.modules`` is restored right after.
    """
    import sys

    import torch

    if "torch._dynamo" in sys.modules or "triton" in sys.modules or torch.cuda.is_available():
        return
    sys.modules["triton"] = None  # type: ignore[assignment]  # makes `import triton` raise ImportError
    try:
        import torch._dynamo  # noqa: F401
    finally:
        if sys.modules.get("triton", 0) is None:
            del sys.modules["triton"]


class FinetuneWidget(BackgroundRunMixin, QWidget):
    """Dock widget: scan + corrected labels + model -> fine-tune (progress, Cancel) -> new model, re-segmented."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.cancel_event = threading.Event()
        self.max_steps: int | None = None
        """Optional step limit (tests and demos); the time budget always applies."""
        self.finetune_options: dict[str, Any] = {}
        """Extra keyword arguments for :func:`finetune` (tests: patch size, eval_every)."""
        self.last_outcome: str | None = None
        """'done', 'cancelled' or 'error' for the latest run."""
        self.last_result: Any = None
        self.last_message: str = ""
        self.base_name: str | None = None
        self.new_name: str | None = None
        self._confirm: Callable[[str], bool] = self._ask
        self._seen: tuple[int, int] | None = None
        self._bridge = ProgressBridge()
        self._bridge.progress.connect(self._on_progress)

        intro = QLabel(EXPLANATION)
        intro.setWordWrap(True)
        intro.setTextFormat(Qt.TextFormat.RichText)

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The 3D scan the corrections were made on (Image layers)")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The corrected label map (the one reviewed in Review & correct)")
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("The model to adapt (by default the one that produced the labels)")
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(5, 3600)
        self.budget_spin.setValue(60)
        self.budget_spin.setSuffix(" s")
        self.budget_spin.setToolTip("Training stops after this many seconds (the re-segmentation comes on top)")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(TRAIN_MODES))
        self.mode_combo.setToolTip("Decoder + norms (parameter-efficient): the encoder stays frozen except its "
                                   "normalisation layers; safer with few slices. Full network: every weight trains; "
                                   "needs more corrected slices.")
        for combo in (self.image_combo, self.labels_combo, self.model_combo, self.mode_combo):
            # long layer / model names must not widen the dock: elide them (the full name is in the list)
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Scan:", self.image_combo)
        form.addRow("Corrected labels:", self.labels_combo)
        form.addRow("Model to adapt:", self.model_combo)
        form.addRow("Time budget:", self.budget_spin)
        form.addRow("What to train:", self.mode_combo)

        self.supervision = QLabel("")
        self.supervision.setWordWrap(True)
        self.supervision.setTextFormat(Qt.TextFormat.RichText)

        self.run_button = QPushButton("Fine-tune on my corrections")
        self.run_button.setStyleSheet("font-weight: bold;")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 2)
        buttons.addWidget(self.cancel_button, 1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFormat("Idle")
        self.progress.setTextVisible(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        result_box = QGroupBox("Result")
        self.result_label = QLabel("No fine-tuned model yet.")
        self.result_label.setWordWrap(True)
        self.result_label.setTextFormat(Qt.TextFormat.RichText)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.revert_button = QPushButton("Revert to base model")
        self.revert_button.setToolTip("Select the base model again in Segment and here (the fine-tuned model stays "
                                      "in the store; Undo in Review & correct takes back its labels)")
        self.revert_button.setEnabled(False)
        result_layout = QVBoxLayout(result_box)
        result_layout.addWidget(self.result_label)
        result_layout.addWidget(self.revert_button)

        store_box = QGroupBox("Fine-tuned models")
        self.store_label = QLabel("")
        self.store_label.setWordWrap(True)
        self.store_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.clear_button = QPushButton("Clear…")
        self.clear_button.setToolTip("Delete every fine-tuned model in this folder (asks first)")
        store_row = QHBoxLayout(store_box)
        store_row.addWidget(self.store_label, 1)
        store_row.addWidget(self.clear_button, 0, Qt.AlignmentFlag.AlignTop)

        self.setMinimumWidth(460)  # room for layer names and the Dice lines without eliding
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.supervision)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(result_box)
        layout.addWidget(store_box)
        layout.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.revert_button.clicked.connect(self.revert_to_base)
        self.clear_button.clicked.connect(self.clear_store)
        self.labels_combo.currentTextChanged.connect(self._labels_changed)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        self._refresh_models()
        self._refresh_layers()
        self._update_store()
        self._poll = QTimer(self)  # the review widget changes the edit log: keep the counts current
        self._poll.setInterval(500)
        self._poll.timeout.connect(self._update_supervision)
        self._poll.start()

    # ---- pickers -----------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Image, Labels

        refill_layer_combo(self.image_combo, self.viewer.layers, Image)
        refill_layer_combo(self.labels_combo, self.viewer.layers, Labels, newest=True)
        self._labels_changed(self.labels_combo.currentText())

    def _refresh_models(self, select: str | None = None) -> None:
        names = [n for n in list_models() if get_model_spec(n).contract.spatial_dims == 3]
        current = select or self.model_combo.currentText()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems(names)
        if current in names:
            self.model_combo.setCurrentText(current)
        self.model_combo.blockSignals(False)

    def _labels_changed(self, _name: str) -> None:
        layer = self.selected_labels()
        if layer is not None and not self.running:
            model = session_for(layer).model_name
            if model and self.model_combo.findText(model) >= 0:
                self.model_combo.setCurrentText(model)
        self._seen = None
        self._update_supervision()

    def selected_image(self) -> Any:
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def selected_labels(self) -> Any:
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _history(self) -> Any:
        layer = self.selected_labels()
        if layer is None:
            return None
        history = session_for(layer).history
        return history if history is not None and history.labels is layer.data else None

    def _update_supervision(self) -> None:
        history = self._history()
        key = (id(history), history.version if history is not None else -1)
        if key == self._seen:
            return
        self._seen = key
        reviewed, corrected, voxels, total = supervision_counts(history.edit_log if history is not None else None)
        if total == 0:
            self.supervision.setText("Nothing to learn from yet: in <b>Review &amp; correct</b>, correct some "
                                     "slices and mark them reviewed.")
        else:
            self.supervision.setText(
                f"Learns from <b>{total}</b> axial slice(s): {reviewed} reviewed, {corrected} with corrections "
                f"({voxels:,} corrected voxels).")

    def _update_store(self) -> None:
        from ...training.model_store import default_model_store, list_finetuned

        folder = default_model_store()
        try:
            n = len(list_finetuned(folder))
        except OSError:
            n = 0
        shown = str(folder)
        home = str(Path.home())
        if shown.startswith(home + os.sep):
            shown = "~" + shown[len(home):]
        self.store_label.setText(f"Folder: {shown}\n{n} model(s) stored (weights and model cards only; "
                                 "no image data).")
        self.store_label.setToolTip(str(folder))
        self.clear_button.setEnabled(n > 0 and not self.running)

    # ---- running -----------------------------------------------------------------
    def _fail(self, message: str, level: str = "error") -> bool:
        self.last_outcome = "error"
        self.last_message = message
        self.status.setText(message)
        notify(level, message)
        return False

    def run(self) -> bool:
        """Fine-tune on the selected labels layer's reviewed / corrected slices (worker thread)."""
        from napari.qt.threading import create_worker

        from ...training.finetune import CorrectionExample, finetune
        from ...training.model_store import default_model_store, load_finetuned, save_finetuned

        if self.running:
            notify("warning", "A fine-tuning run is in progress; cancel it first.")
            return False
        image, labels_layer = self.selected_image(), self.selected_labels()
        if image is None or labels_layer is None:
            return self._fail("Pick a scan and its corrected labels layer first (run Segment to get one).")
        history = self._history()
        if history is None or supervision_counts(history.edit_log)[3] == 0:
            return self._fail("Nothing to learn from: in Review & correct, review or correct some slices first "
                              "(correct the labels, then press 'Mark slice reviewed').", "warning")
        model = self.model_combo.currentText()
        if not model:
            return self._fail("No 3D model is registered.")
        try:
            volume = layer_volume(image)
        except ValueError as exc:
            return self._fail(f"Cannot fine-tune: {exc}")
        if tuple(volume.shape) != tuple(history.labels.shape):
            return self._fail(f"The labels {tuple(history.labels.shape)} are not on the scan's grid "
                              f"{tuple(volume.shape)}: pick the scan these labels belong to.")
        example = CorrectionExample(volume, np.array(history.labels, copy=True), _copy_log(history.edit_log))
        mode = TRAIN_MODES[self.mode_combo.currentText()]
        budget = float(self.budget_spin.value())
        options = dict(self.finetune_options)
        store = default_model_store()
        cancel = self.cancel_event = threading.Event()
        bridge = self._bridge
        max_steps = self.max_steps

        def work() -> tuple[str, Any]:
            # worker thread: no Qt widgets, no napari layers here
            try:
                _import_dynamo_without_triton()

                def train_progress(f: float, stage: str) -> None:
                    text = "Evaluating the base model" if stage.startswith("evaluating") else (
                        "Learning from your corrections" if stage.startswith("step") else "Finishing")
                    bridge.progress.emit(TRAIN_SHARE * float(f), text)

                result = finetune(model, [example], budget_s=budget, max_steps=max_steps, mode=mode,
                                  progress=train_progress, cancel=cancel, **options)
                if cancel.is_set() or result.stop_reason == "cancelled":
                    return "cancelled", None
                if result.steps == 0:
                    return "error", ("No training step could be run: mark at least two slices reviewed "
                                     "(one is held back to measure the Dice).")
                seg = segment(volume, result.spec, progress=lambda f, s: bridge.progress.emit(
                    TRAIN_SHARE + (1 - TRAIN_SHARE) * float(f), "Re-segmenting with the fine-tuned model"),
                    cancel=cancel)
                if cancel.is_set():
                    return "cancelled", None
                stored = save_finetuned(result.model, result.card, result.spec.name, store=store)
                spec = load_finetuned(stored.name, store, register_it=False)
                return "done", (result, seg, spec, stored)
            except SegmentationCancelled:
                return "cancelled", None
            except ValueError as exc:
                return "error", f"Cannot fine-tune: {exc}"
            except Exception as exc:  # a model or device failure must not crash napari
                return "error", f"Fine-tuning failed ({type(exc).__name__}): {exc}"

        self.last_outcome, self.last_message = None, ""
        self.base_name = model
        self._set_running(True)
        self.progress.setValue(0)
        self.progress.setFormat("Starting… %p%")
        self.status.setText(f"Fine-tuning {model} ({mode}, at most {budget:.0f} s)…")
        worker = create_worker(work)
        worker.returned.connect(lambda out: self._on_returned(out, labels_layer))
        worker.errored.connect(lambda exc: self._on_returned(("error", f"Fine-tuning failed: {exc}"), labels_layer))
        self.worker = worker
        worker.start()
        return True

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in (self.image_combo, self.labels_combo, self.model_combo, self.budget_spin, self.mode_combo):
            w.setEnabled(not running)
        self.revert_button.setEnabled(not running and self.new_name is not None)
        self.clear_button.setEnabled(not running)

    def _on_returned(self, outcome: tuple[str, Any], labels_layer: Any) -> None:
        kind, payload = outcome
        self.worker = None
        self._set_running(False)
        if kind == "cancelled" or (kind == "done" and self.cancel_event.is_set()):
            self.last_outcome = "cancelled"
            self.progress.setValue(0)
            self.progress.setFormat("Cancelled")
            self.last_message = f"Fine-tuning cancelled: nothing was saved; {self.base_name} is still the model."
            self.status.setText(self.last_message)
            notify("info", self.last_message)
        elif kind == "error":
            self.progress.setFormat("Failed")
            self._fail(str(payload))
        else:
            try:
                self._apply_result(*payload, labels_layer=labels_layer)
                self.last_outcome = "done"
            except Exception as exc:  # keep napari alive; say what went wrong
                self._fail(f"The fine-tuned model could not be applied: {type(exc).__name__}: {exc}")
        self._update_store()
        self._seen = None
        self._update_supervision()

    # ---- result ------------------------------------------------------------------
    def _apply_result(self, result: Any, seg: Any, spec: Any, stored: Any, labels_layer: Any) -> None:
        from ...models.registry import REGISTRY, register

        if spec.name not in REGISTRY:
            register(spec)
        self.last_result, self.new_name = result, spec.name
        refresh_segment_models(select=spec.name)
        self._refresh_models(select=spec.name)
        kept = self._apply_labels(seg, labels_layer, spec.name)
        self.revert_button.setEnabled(True)
        self.result_label.setText(self._result_html(result, spec.name, kept))
        self.progress.setValue(1000)
        self.progress.setFormat("Done — %p%")
        self.last_message = (f"Saved and selected {spec.name}; the scan was re-segmented with it "
                             f"({kept:,} confirmed voxels kept as you left them).")
        self.status.setText(self.last_message)
        notify("info", self.last_message)

    def _apply_labels(self, seg: Any, labels_layer: Any, model_name: str) -> int:
        """Write the new model's labels as one undoable step, except where the user confirmed them."""
        session = session_for(labels_layer)
        history = session.history
        if history is None or history.labels is not labels_layer.data:
            raise ValueError(f"the labels layer {labels_layer.name!r} is no longer bound to its edit history")
        with history.lock:
            confirmed = history.edit_log.reviewed_mask()  # now: includes edits made while training
            new = np.asarray(seg.labels.array)
            history.apply("model_run", new, mask=~confirmed, axis=AXIS)
        labels_layer.refresh()
        session.model_name = model_name
        session.uncertainty = seg.uncertainty
        session.probabilities = seg.probabilities
        entry = (labels_layer.metadata.get(METADATA_KEY) or {}).get("segmentation")
        if isinstance(entry, dict):
            entry["model_name"] = model_name
        return int(confirmed.sum())

    @staticmethod
    def _result_html(result: Any, name: str, kept: int) -> str:
        rows = [f"<b>{html.escape(name)}</b>"]
        before, after = result.dice_before, result.dice_after
        if before and after:
            rows.append(f"Dice on {result.heldout_slices} held-back slice(s): "
                        f"<b>{before['mean']:.3f} → {after['mean']:.3f}</b>")
            for cls in (k for k in before if k != "mean"):
                rows.append(f"&nbsp;&nbsp;{html.escape(cls)}: {before[cls]:.3f} → {after.get(cls, float('nan')):.3f}")
            if result.best_step == 0:
                rows.append("The base model was not beaten on the held-back slices: the new model keeps its weights.")
        else:
            rows.append("No slice was held back (review at least 2 slices to measure Dice before → after).")
        rows.append(f"{result.steps} steps on {result.train_slices} slice(s) in {result.seconds:.0f} s "
                    f"({html.escape(STOP_REASONS.get(result.stop_reason, result.stop_reason))}).")
        anchored = (getattr(result, "card", None) or {}).get("anchored_classes") or []
        if anchored:
            rows.append("Kept close to the base model (none of your corrections shows them): "
                        f"{html.escape(', '.join(anchored))}.")
        rows.append(f"Re-segmented; {kept:,} reviewed / corrected voxels kept. Undo in Review &amp; correct "
                    "takes the new labels back.")
        return "<br>".join(rows)

    def revert_to_base(self) -> None:
        """Select the base model again (in Segment and here)."""
        if self.base_name is None:
            return
        refresh_segment_models(select=self.base_name)
        self._refresh_models(select=self.base_name)
        self.last_message = f"Reverted to the base model {self.base_name}."
        self.status.setText(self.last_message)
        self.revert_button.setEnabled(False)
        notify("info", self.last_message)

    # ---- store -------------------------------------------------------------------
    def _ask(self, text: str) -> bool:
        answer = QMessageBox.question(self, "Delete fine-tuned models", text,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def clear_store(self) -> int:
        """Delete every fine-tuned model of the store (after confirmation); returns how many were deleted."""
        from ...training.model_store import clear_finetuned, default_model_store, list_finetuned

        if self.running:
            return 0
        folder = default_model_store()
        models = list_finetuned(folder)
        if not models:
            self._update_store()
            return 0
        if not self._confirm(f"Delete {len(models)} fine-tuned model(s) from\n{folder}?\n\nThe base models are "
                             "not affected. This cannot be undone."):
            return 0
        n = clear_finetuned(folder)
        fallback = self.base_name if self.base_name in list_models() else None
        refresh_segment_models(select=fallback)
        self._refresh_models(select=fallback)
        self.new_name = None
        self.revert_button.setEnabled(False)
        self.result_label.setText("No fine-tuned model yet.")
        self._update_store()
        self.last_message = f"Deleted {n} fine-tuned model(s) from {folder}."
        self.status.setText(self.last_message)
        notify("info", self.last_message)
        return n

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.cancel()
        self._poll.stop()
        super().closeEvent(event)
