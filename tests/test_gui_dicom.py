"""GUI: open the real DICOM series in napari, paint a label, save it on the DICOM grid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
sitk = pytest.importorskip("SimpleITK")

from napari_medmamba._napari._layers import add_labels_like  # noqa: E402

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-medmamba"
SCREENSHOT = ROOT / "docs" / "images" / "dicom_reader.png"


def _sitk_dicom(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_open_paint_save_dicom_series(make_napari_viewer, dicom_series: Path, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open(str(dicom_series), plugin=PLUGIN)
    assert len(layers) == 1
    image = layers[0]
    reference = _sitk_dicom(dicom_series)
    assert image.data.shape == (20, 512, 512)
    np.testing.assert_allclose(image.scale, (2.0, 0.9765625, 0.9765625), atol=1e-6)
    for index in [(0, 0, 0), (19, 511, 511), (7, 300, 123)]:
        physical = np.asarray(reference.TransformIndexToPhysicalPoint(tuple(reversed(index))))[::-1]
        np.testing.assert_allclose(image.data_to_world(index), physical, atol=1e-6)

    labels = add_labels_like(viewer, image, name="painted labels")
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.data_to_world((3, 4, 5)), image.data_to_world((3, 4, 5)), atol=1e-9)
    z = 10
    viewer.dims.set_point(0, image.data_to_world((z, 0, 0))[0])
    labels.brush_size = 60
    labels.selected_label = 1
    labels.paint((z, 300, 150), 1, refresh=True)  # liver; data coordinates (z, y, x)
    labels.brush_size = 22
    labels.paint((z, 299, 263), 2, refresh=True)  # contrast-filled aorta
    assert labels.data[z, 300, 150] == 1 and (labels.data == 1).sum() > 1000
    aorta = image.data[labels.data == 2]
    assert aorta.size > 200 and np.median(aorta) > 120  # the label sits on the bright aorta

    saved = labels.save(str(tmp_path / "painted.nii.gz"), plugin=PLUGIN)
    written = sitk.ReadImage(saved[0])
    assert written.GetSize() == reference.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(written, get)(), getattr(reference, get)(), atol=1e-6, err_msg=get)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels.data)

    viewer.reset_view()
    shot = tmp_path / "dicom_reader.png"
    viewer.screenshot(path=str(shot), canvas_only=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MEDMAMBA_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
