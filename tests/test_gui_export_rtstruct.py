"""GUI: the Export widget's RTSTRUCT checkbox, on the real DICOM series and on a non-DICOM layer.

Run under a display: ``xvfb-run -a python -m pytest tests/test_gui_export_rtstruct.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_medmamba.export import rtstruct_roi_names, rtstruct_to_labels
from napari_medmamba.io import read_volume

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _autosave_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDMAMBA_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def test_export_widget_writes_an_rtstruct(make_napari_viewer, qtbot, dicom_series: Path, tmp_path: Path) -> None:
    from napari_medmamba._napari._layers import add_labels_like
    from napari_medmamba._napari._widgets._common import session_for
    from napari_medmamba._napari._widgets.export import ExportWidget

    viewer = make_napari_viewer()
    (image,) = viewer.open(str(dicom_series), plugin="napari-medmamba")
    data = np.zeros(image.data.shape, np.uint8)
    data[4:9, 150:250, 180:300] = 1
    data[6, 190:210, 220:240] = 0  # a hole
    data[10:12, 300:340, 200:260] = 2
    labels = add_labels_like(viewer, image, name="organs", data=data)
    session = session_for(labels)
    session.label_names = ("background", "liver", "aorta")
    session.label_colors = ("#000000", "#2ca02c", "#d62728")

    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export")
    assert export.selected_layer() is labels
    keys = list(export.checks)
    assert keys.index("rtstruct") == keys.index("dicom_seg") + 1  # next to DICOM-SEG
    assert export.checks["rtstruct"].isEnabled() and "RTSTRUCT" in export.checks["rtstruct"].text()
    assert "RTSTRUCT" in export.dicom_note.text()
    for key, check in export.checks.items():
        check.setChecked(key == "rtstruct")
    assert export.selected_formats() == ["rtstruct"]
    out = tmp_path / "export"
    export.folder_edit.setText(str(out))
    export.export()
    qtbot.waitUntil(lambda: export.worker is None, timeout=60_000)
    assert not export.last_errors, export.last_errors
    (written,) = export.last_written
    assert written == out / f"{export.stem_edit.text()}_rtstruct.dcm"
    assert rtstruct_roi_names(written) == {1: "liver", 2: "aorta"}
    back = rtstruct_to_labels(written, read_volume(dicom_series))
    np.testing.assert_array_equal(back, data)


def test_rtstruct_is_disabled_without_a_dicom_source(make_napari_viewer, qtbot) -> None:
    from napari_medmamba._napari._widgets.export import ExportWidget

    viewer = make_napari_viewer()
    data = np.zeros((8, 16, 16), np.uint8)
    data[2:5, 4:9, 4:9] = 1
    viewer.add_labels(data, name="lesion", scale=(2.0, 0.5, 0.5))
    export = ExportWidget(viewer)
    for key in ("dicom_seg", "rtstruct"):
        export.checks[key].setChecked(True)
        assert not export.checks[key].isEnabled()
    assert "rtstruct" not in export.selected_formats()
    assert "RTSTRUCT" in export.dicom_note.text() and "DICOM series" in export.dicom_note.text()
