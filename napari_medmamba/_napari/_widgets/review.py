"""Review & correct dock widget: uncertainty-guided review, interpolation, undo/redo, autosave.

Every change of the selected Labels layer goes through one
:class:`~napari_medmamba.annotation.LabelHistory` (sparse undo/redo + edit log): our tools
apply their edits through it, and napari's own brush / fill / eraser strokes are recorded
from the layer's ``paint`` events with ``record_applied``, so Undo/Redo here cover both.
An :class:`~napari_medmamba.annotation.AutosaveSession` saves labels + edit log every N s
(in a background thread) and when the widget closes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...annotation import (AutosaveError, AutosaveSession, LabelHistory, interpolate_label, next_slice_to_review,
                           scribble_refine, slab)
from .._layers import METADATA_KEY, labels_layer_data
from ._common import SCRIBBLES_KEY, LayerSession, layer_volume, notify, refill_layer_combo, session_for

if TYPE_CHECKING:
    import napari

__all__ = ["ReviewWidget", "paint_event_changes"]

AXIS = 0
"""Axial slices: axis 0 of the (z, y, x) grid."""


def paint_event_changes(
    atoms: list[Any], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """Flat indices, *original* and new values of the voxels a napari ``paint`` event changed.

    napari >= 0.5 emits ``value=[atom, ...]``; an atom is either ``(indices, old, new)``
    or (napari >= 0.9) a ``_MaskedPaintAtom(slice_key, mask, old_values, new_value)``.
    Overlapping atoms of one stroke keep the value before the first of them and the
    value after the last. napari may emit the event before it writes the data, so the
    new values come from the atoms, not from the array.
    Returns (flat indices, old values, new values, painted value or None when mixed).
    """
    flats: list[np.ndarray] = []
    olds: list[np.ndarray] = []
    news: list[np.ndarray] = []
    new_values: set[int] = set()
    for atom in atoms:
        if hasattr(atom, "slice_key"):
            key = tuple(atom.slice_key)
            starts = [s.start or 0 for s in key]
            stops = [shape[a] if s.stop is None else s.stop for a, s in enumerate(key)]
            sizes = [b - a for a, b in zip(starts, stops)]
            if atom.mask is None:
                local = np.indices(sizes).reshape(len(sizes), -1)
                old = np.asarray(atom.old_values).reshape(-1)
            else:
                local = np.array(np.nonzero(atom.mask))
                old = np.asarray(atom.old_values).reshape(-1)
            coords = tuple(local[a] + starts[a] for a in range(len(sizes)))
            flat = np.ravel_multi_index(coords, shape).astype(np.int64)
            flats.append(flat)
            olds.append(old)
            news.append(np.full(flat.shape, int(atom.new_value)))
            new_values.add(int(atom.new_value))
        else:
            indices, old, new = atom
            coords = tuple(np.asarray(i) for i in indices)
            flat = np.ravel_multi_index(coords, shape).astype(np.int64).ravel()
            flats.append(flat)
            olds.append(np.broadcast_to(np.asarray(old), flat.shape).ravel())
            news.append(np.broadcast_to(np.asarray(new), flat.shape).ravel())
            new_values.update(int(v) for v in np.unique(np.asarray(new)))
    if not flats:
        return np.empty(0, np.int64), np.empty(0), np.empty(0), None
    flat = np.concatenate(flats)
    old = np.concatenate(olds)
    new = np.concatenate(news)
    unique, first = np.unique(flat, return_index=True)
    last = flat.size - 1 - np.unique(flat[::-1], return_index=True)[1]
    return unique, old[first], new[last], (new_values.pop() if len(new_values) == 1 else None)


class ReviewWidget(QWidget):
    """Dock widget: next slice to review, mark reviewed, interpolate, undo/redo, autosave."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer: Any = None
        self.session: LayerSession | None = None
        self.recovery: Any = None

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The label map to review and correct (Labels layers)")

        review_box = QGroupBox("Review (axial slices)")
        self.next_button = QPushButton("Next slice to review")
        self.next_button.setToolTip("Go to the unreviewed axial slice where the model is least certain")
        self.reviewed_button = QPushButton("Mark slice reviewed")
        self.review_status = QLabel("")
        row = QHBoxLayout()
        row.addWidget(self.next_button)
        row.addWidget(self.reviewed_button)
        review_layout = QVBoxLayout(review_box)
        review_layout.addLayout(row)
        review_layout.addWidget(self.review_status)

        interp_box = QGroupBox("Interpolate a label between two slices")
        self.label_spin = QSpinBox()
        self.label_spin.setRange(1, 65535)
        self.slice_a = QSpinBox()
        self.slice_b = QSpinBox()
        for spin in (self.slice_a, self.slice_b):
            spin.setRange(0, 0)
        self.interp_button = QPushButton("Interpolate")
        interp_form = QFormLayout(interp_box)
        interp_form.addRow("Label:", self.label_spin)
        interp_form.addRow("From slice:", self.slice_a)
        interp_form.addRow("To slice:", self.slice_b)
        interp_form.addRow(self.interp_button)

        scribble_box = QGroupBox("Refine a label from scribbles (current slice)")
        self.scribble_button = QPushButton("Add scribble layer")
        self.scribble_button.setToolTip("Paint 1 = inside and 2 = outside the label on the current slice")
        self.refine_button = QPushButton("Refine slice")
        self.refine_button.setToolTip("Re-segment the label on this slice from the model's probabilities and the scribbles")
        scribble_row = QHBoxLayout(scribble_box)
        scribble_row.addWidget(self.scribble_button)
        scribble_row.addWidget(self.refine_button)
        self.scribble_layer: Any = None

        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        undo_row = QHBoxLayout()
        undo_row.addWidget(self.undo_button)
        undo_row.addWidget(self.redo_button)

        autosave_box = QGroupBox("Autosave")
        self.interval_spin = QSpinBox()
        self.interval_spin.setRange(5, 3600)
        self.interval_spin.setValue(30)
        self.interval_spin.setSuffix(" s")
        self.restore_button = QPushButton("Restore autosaved edits")
        self.restore_button.setEnabled(False)
        self.autosave_status = QLabel("")
        self.autosave_status.setWordWrap(True)
        autosave_form = QFormLayout(autosave_box)
        autosave_form.addRow("Save every:", self.interval_spin)
        autosave_form.addRow(self.restore_button)
        autosave_form.addRow(self.autosave_status)

        self.edits_status = QLabel("")
        self.edits_status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Labels:", self.layer_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(review_box)
        layout.addWidget(interp_box)
        layout.addWidget(scribble_box)
        layout.addLayout(undo_row)
        layout.addWidget(self.edits_status)
        layout.addWidget(autosave_box)
        layout.addStretch(1)

        self.next_button.clicked.connect(self.next_slice)
        self.reviewed_button.clicked.connect(self.mark_reviewed)
        self.interp_button.clicked.connect(self.interpolate)
        self.scribble_button.clicked.connect(self.add_scribble_layer)
        self.refine_button.clicked.connect(self.refine_from_scribbles)
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        self.restore_button.clicked.connect(self.restore_autosave)
        self.interval_spin.valueChanged.connect(self._interval_changed)
        self.layer_combo.currentTextChanged.connect(self._select_layer)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # ---- layer binding ---------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Labels

        self._select_layer(refill_layer_combo(self.layer_combo, self.viewer.layers, Labels, newest=True))

    def _select_layer(self, name: str) -> None:
        layer = self.viewer.layers[name] if name and name in self.viewer.layers else None
        if layer is self.layer:
            self._update_status()
            return
        self._unbind()
        if layer is not None:
            self._bind(layer)
        self._update_status()

    def _bind(self, layer: Any) -> None:
        data = layer.data
        if not isinstance(data, np.ndarray) or data.ndim != 3:
            notify("warning", f"Layer {layer.name!r} is not a 3D label map in memory; review tools are off for it.")
            return
        if not (data.flags.c_contiguous and data.flags.writeable):
            layer.data = np.ascontiguousarray(data)
        session = session_for(layer)
        if session.history is None or session.history.labels is not layer.data:
            session.history = LabelHistory(layer.data)
        self.layer, self.session = layer, session
        layer.events.paint.connect(self._on_paint)
        n = layer.data.shape[AXIS]
        for spin in (self.slice_a, self.slice_b):
            spin.setRange(0, n - 1)
        present = [int(v) for v in np.unique(layer.data) if v]
        if present:
            self.label_spin.setValue(present[0])
        self._start_autosave()

    def _unbind(self) -> None:
        if self.layer is not None:
            try:
                self.layer.events.paint.disconnect(self._on_paint)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._stop_autosave()
        self.layer, self.session, self.recovery = None, None, None
        self.restore_button.setEnabled(False)

    def _scan_key(self) -> str:
        entry = self.layer.metadata.get(METADATA_KEY) or {}
        source = entry.get("source")
        # one autosave per scan *and* label layer (two label maps of one scan must not clash)
        return f"{source or 'unsaved scan'}::{self.layer.name}"

    # ---- autosave ----------------------------------------------------------------------
    def _start_autosave(self) -> None:
        assert self.session is not None and self.session.history is not None
        if self.session.autosave is None:
            self.session.autosave = AutosaveSession(
                self._scan_key(), interval_s=float(self.interval_spin.value()), history=self.session.history,
                on_error=lambda exc: None,
            )
        autosave = self.session.autosave
        autosave.attach(self.session.history)
        self.recovery = autosave.find_recovery()
        if self.recovery is not None and not np.array_equal(self.recovery.labels, self.layer.data):
            when = time.strftime("%H:%M:%S", time.localtime(self.recovery.timestamp))
            self.restore_button.setEnabled(True)
            self.restore_button.setText(f"Restore autosaved edits ({when})")
            notify("info", f"Autosaved edits of {self.layer.name!r} from {when} were found: "
                           "press 'Restore autosaved edits' in Review & correct to get them back.")
        else:
            self.recovery = None
            self.restore_button.setEnabled(False)
            self.restore_button.setText("Restore autosaved edits")
            autosave.start()

    def _stop_autosave(self) -> None:
        if self.session is not None and self.session.autosave is not None:
            try:
                self.session.autosave.stop(final_save=self.recovery is None)
            except AutosaveError as exc:
                notify("error", f"Autosave failed: {exc}")

    def _interval_changed(self, value: int) -> None:
        if self.session is not None and self.session.autosave is not None:
            autosave = self.session.autosave
            was_running = autosave.running
            if was_running:
                autosave.stop(final_save=False)
            autosave.interval_s = float(value)
            if was_running:
                autosave.start()

    def save_now(self) -> None:
        """Autosave now (also done on close and every N seconds)."""
        if self.session is None or self.session.autosave is None:
            return
        if self.recovery is not None:
            return  # do not overwrite an unrestored autosave before the user decided
        try:
            path = self.session.autosave.save_now()
            if path is not None:
                self.autosave_status.setText(f"Saved {time.strftime('%H:%M:%S')}")
        except AutosaveError as exc:
            notify("error", f"Autosave failed: {exc}")

    def restore_autosave(self) -> bool:
        """Put the autosaved labels and edit log back (undoable history restarts)."""
        if self.session is None or self.session.autosave is None:
            return False
        try:
            info = self.session.autosave.restore()
        except (AutosaveError, ValueError) as exc:
            notify("error", f"Could not restore the autosave: {exc}")
            return False
        if info is None:
            notify("warning", "No readable autosave was found.")
            return False
        self.recovery = None
        self.restore_button.setEnabled(False)
        self.layer.refresh()
        self.session.autosave.start()
        notify("info", f"Restored the autosaved edits of {self.layer.name!r}.")
        self._update_status()
        return True

    def discard_autosave(self) -> None:
        """Ignore the found autosave and autosave the current labels from now on."""
        if self.session is not None and self.session.autosave is not None and self.recovery is not None:
            self.recovery = None
            self.restore_button.setEnabled(False)
            self.session.autosave.start()

    # ---- edits ------------------------------------------------------------------------
    def _on_paint(self, event: Any) -> None:
        """Record a napari brush / fill / eraser stroke (already applied) into our history."""
        if self.session is None or self.session.history is None:
            return
        try:
            flat, old, new, value = paint_event_changes(list(event.value), self.layer.data.shape)
            history = self.session.history
            mode = str(getattr(self.layer, "mode", "paint"))
            kind = "erase" if value == 0 or mode == "erase" else ("fill" if mode == "fill" else "paint")
            with history.lock:
                history.labels.reshape(-1)[flat] = new  # what napari writes (now or just after)
                entry = history.record_applied(kind, flat, old, axis=AXIS)
        except Exception as exc:  # never let an event handler break painting
            notify("warning", f"This edit could not be recorded for undo: {exc}")
            return
        if entry is not None:
            self._after_edit(entry)

    def _after_edit(self, entry: Any) -> None:
        assert self.session is not None
        z = np.unravel_index(entry.indices, self.layer.data.shape)[AXIS]
        self.session.note_edited(z)
        last = self.session.edited_slices[-2:]
        if len(last) == 2:
            a, b = sorted(last)
            self.slice_a.setValue(a)
            self.slice_b.setValue(b)
        values = [int(v) for v in np.unique(entry.new) if v]
        if values:
            self.label_spin.setValue(values[0])
        self._update_status()

    def _require(self) -> bool:
        if self.session is None or self.session.history is None:
            notify("warning", "Pick a 3D Labels layer under 'Labels' first.")
            return False
        return True

    def interpolate(self) -> bool:
        """Fill the slices between 'From' and 'To' with the label by shape interpolation."""
        if not self._require():
            return False
        label, a, b = self.label_spin.value(), self.slice_a.value(), self.slice_b.value()
        history = self.session.history
        try:
            spacing = layer_volume(self.layer).geometry.spacing_zyx[1:]
            block = interpolate_label(history.labels, label, AXIS, a, b, spacing=spacing)
            lo, hi = sorted((a, b))
            entry = history.apply("interpolate", block, region=slab(history.labels.shape, AXIS, lo + 1, hi), axis=AXIS)
        except ValueError as exc:
            notify("error", f"Cannot interpolate: {exc}")
            return False
        self.layer.refresh()
        if entry is None:
            notify("info", "Interpolation changed nothing.")
        else:
            self.session.note_edited(np.unravel_index(entry.indices, history.labels.shape)[AXIS])
            self._update_status()
        return True

    def add_scribble_layer(self) -> Any:
        """A Labels layer on the same grid for scribbles: 1 = inside the label, 2 = outside."""
        if not self._require():
            return None
        volume = layer_volume(self.layer)
        data, kwargs, _ = labels_layer_data(np.zeros(volume.shape, np.uint8), like=volume,
                                            name=f"{self.layer.name} scribbles")
        kwargs["metadata"] = {**kwargs["metadata"], SCRIBBLES_KEY: True}
        self.scribble_layer = self.viewer.add_labels(data, **kwargs)
        self.scribble_layer.brush_size = 3
        self.scribble_layer.selected_label = 1
        self.scribble_layer.mode = "paint"
        notify("info", "Scribble with label 1 inside and label 2 outside the structure, then press 'Refine slice'.")
        return self.scribble_layer

    def refine_from_scribbles(self) -> bool:
        """Re-segment the chosen label on the current slice (random walker on the model's probabilities)."""
        if not self._require():
            return False
        if self.session.probabilities is None:
            notify("warning", f"{self.layer.name!r} has no model probabilities: run Segment first.")
            return False
        if self.scribble_layer is None or self.scribble_layer not in self.viewer.layers:
            notify("warning", "Add a scribble layer and scribble on the slice first.")
            return False
        z, label, history = self.current_slice(), self.label_spin.value(), self.session.history
        scribbles = np.asarray(self.scribble_layer.data)[z]
        try:
            new_slice = scribble_refine(self.session.probabilities, history.labels, scribbles == 1, scribbles == 2,
                                        z, AXIS, label)
            entry = history.apply("scribble", new_slice[None], region=slab(history.labels.shape, AXIS, z, z + 1),
                                  axis=AXIS)
        except (ValueError, IndexError) as exc:
            notify("error", f"Cannot refine slice {z}: {exc}")
            return False
        self.scribble_layer.data[z] = 0
        self.scribble_layer.refresh()
        self.layer.refresh()
        if entry is not None:
            self.session.note_edited(np.array([z]))
        self._update_status()
        return True

    def undo(self) -> None:
        if self._require() and self.session.history.undo() is not None:
            self.layer.refresh()
            self._update_status()

    def redo(self) -> None:
        if self._require() and self.session.history.redo() is not None:
            self.layer.refresh()
            self._update_status()

    # ---- review -----------------------------------------------------------------------
    def current_slice(self) -> int:
        world = np.asarray(self.viewer.dims.point, dtype=float)[-3:]
        z = int(round(float(np.asarray(self.layer.world_to_data(world))[AXIS])))
        return int(np.clip(z, 0, self.layer.data.shape[AXIS] - 1))

    def go_to_slice(self, z: int) -> None:
        world = self.layer.data_to_world((z, 0, 0))
        for axis in range(3):
            if not np.isclose(world[axis], self.layer.data_to_world((z + 1, 0, 0))[axis]):
                self.viewer.dims.set_point(axis, float(world[axis]))

    def next_slice(self) -> int | None:
        """Jump to the unreviewed axial slice with the highest mean uncertainty."""
        if not self._require():
            return None
        if self.session.uncertainty is None:
            notify("warning", f"{self.layer.name!r} has no uncertainty map: run Segment to get one.")
            return None
        reviewed = self.session.history.edit_log.reviewed_indices(AXIS)
        z = next_slice_to_review(self.session.uncertainty, reviewed, axis=AXIS)
        if z is None:
            notify("info", "Every slice has been reviewed.")
            return None
        self.go_to_slice(z)
        self._update_status()
        return z

    def mark_reviewed(self) -> int | None:
        """Mark the slice on screen as reviewed (undoable)."""
        if not self._require():
            return None
        z = self.current_slice()
        self.session.history.accept_slice(AXIS, z)
        self._update_status()
        return z

    def _update_status(self) -> None:
        has = self.session is not None and self.session.history is not None
        for w in (self.next_button, self.reviewed_button, self.interp_button, self.undo_button, self.redo_button):
            w.setEnabled(has)
        if not has:
            self.review_status.setText("No 3D Labels layer selected.")
            self.edits_status.setText("")
            return
        history = self.session.history
        n = history.labels.shape[AXIS]
        done = len(history.edit_log.reviewed_indices(AXIS))
        self.review_status.setText(f"Reviewed {done} of {n} axial slices.")
        self.undo_button.setEnabled(history.can_undo)
        self.redo_button.setEnabled(history.can_redo)
        edits = [e for e in history.edit_log.edits if e.kind not in ("model_run", "accept_slice")]
        self.edits_status.setText(f"{len(edits)} edit(s) recorded; {len(history)} undoable.")

    # ---- closing ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop autosaving (saving once more) and disconnect from the layer."""
        self._unbind()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)
