"""Export dock widget: label map on the source grid, DICOM-SEG, RTSTRUCT, volumes CSV, meshes, summary JSON.

Exports run in a worker thread on a copy of the labels (painting can go on meanwhile).
A failing format is reported in a napari notification; the others are still written and
the layer is never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...export import label_stats
from ...export.all_formats import FORMATS, run_exports, safe_stem
from ._common import layer_volume, notify, refill_layer_combo, session_for

if TYPE_CHECKING:
    import napari

__all__ = ["ExportWidget", "FORMATS", "DICOM_FORMATS", "run_exports"]

DICOM_FORMATS = ("dicom_seg", "rtstruct")
"""Formats that need a scan read from a DICOM series (their checkboxes are disabled otherwise)."""


class ExportWidget(QWidget):
    """Dock widget: folder + formats -> Export; a table of label volumes in mL."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.last_written: list[Path] = []
        self.last_errors: list[str] = []

        self.layer_combo = QComboBox()
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("Folder to write into")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit)
        folder_row.addWidget(browse)
        self.stem_edit = QLineEdit()
        self.stem_edit.setToolTip("Start of every file name")

        form = QFormLayout()
        form.addRow("Labels:", self.layer_combo)
        form.addRow("Folder:", folder_row)
        form.addRow("File name:", self.stem_edit)

        formats_box = QGroupBox("Formats")
        formats_layout = QVBoxLayout(formats_box)
        self.checks: dict[str, QCheckBox] = {}
        for key, text in FORMATS.items():
            check = QCheckBox(text)
            check.setChecked(key in ("nifti", "csv", "json"))
            self.checks[key] = check
            formats_layout.addWidget(check)
        self.dicom_note = QLabel("")
        self.dicom_note.setWordWrap(True)
        self.dicom_note.setStyleSheet("color: #bbbbbb;")
        formats_layout.addWidget(self.dicom_note)

        self.export_button = QPushButton("Export")
        self.export_button.setStyleSheet("font-weight: bold;")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        table_box = QGroupBox("Label volumes")
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Label", "Name", "Volume (mL)", "Voxels"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(110)
        refresh = QPushButton("Refresh volumes")
        refresh.clicked.connect(self.refresh_table)
        table_layout = QVBoxLayout(table_box)
        table_layout.addWidget(self.table)
        table_layout.addWidget(refresh)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(formats_box)
        layout.addWidget(self.export_button)
        layout.addWidget(self.status)
        layout.addWidget(table_box)

        self.export_button.clicked.connect(self.export)
        self.layer_combo.currentTextChanged.connect(self._layer_changed)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Labels

        self._layer_changed(refill_layer_combo(self.layer_combo, self.viewer.layers, Labels, newest=True))

    def selected_layer(self) -> Any:
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _layer_changed(self, name: str) -> None:
        layer = self.selected_layer()
        is_dicom = False
        if layer is not None:
            self.stem_edit.setText(safe_stem(layer.name))
            try:
                is_dicom = layer_volume(layer).dicom is not None
            except ValueError:
                is_dicom = False
        for key in DICOM_FORMATS:
            check = self.checks[key]
            check.setEnabled(is_dicom)
            if not is_dicom:
                check.setChecked(False)
        if not is_dicom:
            self.dicom_note.setText("DICOM-SEG and RTSTRUCT need labels of a scan opened from a DICOM series; "
                                    "this scan was not, so export NIfTI/NRRD/MHA instead.")
        else:
            self.dicom_note.setText("DICOM-SEG and RTSTRUCT reference the source DICOM series "
                                    "(RTSTRUCT: contours for treatment planning).")
        self.refresh_table()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export folder", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    def refresh_table(self) -> None:
        layer = self.selected_layer()
        self.table.setRowCount(0)
        if layer is None:
            return
        try:
            volume = layer_volume(layer)
            names = {i: n for i, n in enumerate(session_for(layer).label_names) if i}
            stats = label_stats(volume.array, volume.geometry, names, include_absent=False)
        except ValueError as exc:
            self.status.setText(f"Volumes unavailable: {exc}")
            return
        self.table.setRowCount(len(stats))
        for row, s in enumerate(stats):
            for col, text in enumerate((str(s.value), s.name, f"{s.volume_ml:.2f}", f"{s.voxel_count:,}")):
                self.table.setItem(row, col, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def selected_formats(self) -> list[str]:
        return [k for k, c in self.checks.items() if c.isChecked() and c.isEnabled()]

    def export(self) -> None:
        """Write the chosen formats in a worker thread; errors become notifications."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            notify("warning", "An export is already running.")
            return
        layer = self.selected_layer()
        if layer is None:
            notify("error", "No Labels layer to export.")
            return
        folder_text = self.folder_edit.text().strip()
        if not folder_text:
            notify("error", "Choose a folder to export into.")
            return
        formats = self.selected_formats()
        if not formats:
            notify("warning", "Tick at least one format.")
            return
        try:
            volume = layer_volume(layer)
        except ValueError as exc:
            notify("error", f"Cannot export: {exc}")
            return
        session = session_for(layer)
        labels = np.array(volume.array, copy=True)
        source = volume.with_array(labels)
        edit_log = None
        if session.history is not None:
            with session.history.lock:
                labels = session.history.labels.copy()
                edit_log = type(session.history.edit_log).from_bytes(session.history.edit_log.to_bytes())
            source = volume.with_array(labels)
        stem = safe_stem(self.stem_edit.text().strip() or layer.name)
        folder = Path(folder_text).expanduser()
        kwargs = dict(label_names=session.label_names, label_colors=session.label_colors,
                      model_name=session.model_name, edit_log=edit_log)
        self.export_button.setEnabled(False)
        self.status.setText(f"Exporting {len(formats)} format(s)…")
        worker = create_worker(lambda: self._safe_run(labels, source, folder, stem, formats, kwargs))
        worker.returned.connect(self._on_done)
        self.worker = worker
        worker.start()

    @staticmethod
    def _safe_run(labels, source, folder, stem, formats, kwargs) -> tuple[list[Path], list[str]]:  # noqa: ANN001
        try:
            return run_exports(labels, source, folder, stem, formats, **kwargs)
        except Exception as exc:
            return [], [f"Export failed: {type(exc).__name__}: {exc}"]

    def _on_done(self, outcome: tuple[list[Path], list[str]]) -> None:
        self.worker = None
        self.export_button.setEnabled(True)
        written, errors = outcome
        self.last_written, self.last_errors = written, errors
        if written:
            folder = written[0].parent
            self.status.setText(f"Wrote {len(written)} file(s) to {folder}")
            notify("info", f"Exported {len(written)} file(s) to {folder}")
        for error in errors:
            notify("error", f"Export: {error}")
        if errors and not written:
            self.status.setText("Nothing was written: " + "; ".join(errors))
        self.refresh_table()
