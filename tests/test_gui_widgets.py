"""GUI: Segment, Review & correct and Export dock widgets on the real DICOM series.

Run under a display: ``xvfb-run -a python -m pytest tests/test_gui_widgets.py``.
``MEDMAMBA_SCREENSHOTS=1`` also copies the screenshots to docs/images/gui_*.png.

A tiny CT model (registered for the test only) keeps the runs fast: it labels soft
tissue (-100..100 HU) and bright structures (> 150 HU: bone, contrast) so the result can
be checked against the anatomy; a ``delay`` per forward pass makes it slow on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
torch = pytest.importorskip("torch")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_medmamba.annotation import next_slice_to_review  # noqa: E402
from napari_medmamba.io import read_volume  # noqa: E402
from napari_medmamba.models import registry  # noqa: E402
from napari_medmamba.models.registry import InputContract, ModelSpec  # noqa: E402

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-medmamba"
TINY = "tiny_ct_test"
SLOW = "slow_ct_test"
CONTRACT = InputContract(
    spatial_dims=3,
    in_channels=1,
    label_names=("background", "soft tissue", "bone / contrast"),
    label_colors=("#000000", "#2ca02c", "#d62728"),
    patch_size=(16, 128, 128),
    target_spacing=(4.0, 2.0, 2.0),
    modality="CT",
    normalization="ct",
    ct_window=(-1000.0, 1000.0),
    ct_stats=(0.0, 100.0),
)


class ThresholdNet(torch.nn.Module):
    """Logits from intensity (x = HU / 100): soft tissue near 0 HU, bright above 150 HU."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.gain = torch.nn.Parameter(torch.tensor(5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        soft = self.gain * (1.0 - x.abs())
        bright = self.gain * (x - 1.5)
        return torch.cat([torch.zeros_like(x), soft, bright], dim=1)


@pytest.fixture(autouse=True)
def _test_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(registry.REGISTRY, TINY, ModelSpec(TINY, lambda: ThresholdNet(), CONTRACT, "test model"))
    monkeypatch.setitem(registry.REGISTRY, SLOW, ModelSpec(SLOW, lambda: ThresholdNet(0.25), CONTRACT, "slow test model"))
    monkeypatch.setenv("MEDMAMBA_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def _messages(start: int = 0) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:]]


def _open_dicom(viewer, dicom_series: Path):
    layers = viewer.open(str(dicom_series), plugin=PLUGIN)
    assert len(layers) == 1
    return layers[0]


def _screenshot(viewer, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    viewer.screenshot(path=str(shot), canvas_only=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MEDMAMBA_SCREENSHOTS") == "1":
        target = ROOT / "docs" / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    return shot


def _segment(qtbot, widget, model: str, timeout: int = 30_000):
    widget.model_combo.setCurrentText(model)
    assert widget.model_combo.currentText() == model
    widget.run()
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


@pytest.mark.usefixtures("network_blocked")  # the GUI flow makes no network attempt (#14)
def test_segment_review_export(make_napari_viewer, qtbot, dicom_series: Path, tmp_path: Path) -> None:
    from napari.layers import Image, Labels

    from napari_medmamba._napari._widgets.export import ExportWidget
    from napari_medmamba._napari._widgets.review import ReviewWidget
    from napari_medmamba._napari._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1400, 900)
    image = _open_dicom(viewer, dicom_series)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    assert seg.image_combo.currentText() == image.name
    seg.model_combo.setCurrentText("unet_3d")
    assert "no trained weights yet" in seg.model_card.text() and "MR" in seg.model_card.text()

    # ---- segment ---------------------------------------------------------------------
    _segment(qtbot, seg, TINY)
    assert seg.last_outcome == "done", _messages()
    labels = seg.last_layer
    assert isinstance(labels, Labels) and labels.name == f"{image.name} {TINY}"
    assert labels.data.shape == image.data.shape == (20, 512, 512)
    for index in [(0, 0, 0), (19, 511, 511), (7, 300, 123)]:
        np.testing.assert_allclose(labels.data_to_world(index), image.data_to_world(index), atol=1e-6)
    # labels follow the anatomy: bright aorta (contrast) is label 2, liver is soft tissue (1)
    assert labels.data[10, 299, 263] == 2 and labels.data[10, 300, 150] == 1
    hu = image.data[labels.data == 2]
    assert hu.size > 1000 and np.median(hu) > 150
    np.testing.assert_allclose(labels.colormap.map(np.array([2]))[0, :3], [0xD6 / 255, 0x27 / 255, 0x28 / 255], atol=1e-3)
    assert "soft tissue" in seg.legend.text() and "bone / contrast" in seg.legend.text()
    meta = labels.metadata["medmamba"]["segmentation"]
    assert meta["label_names"] == list(CONTRACT.label_names) and meta["model_name"] == TINY
    unc = viewer.layers[f"{labels.name} uncertainty"]
    assert isinstance(unc, Image) and not unc.visible and unc.data.shape == labels.data.shape
    assert seg.progress.value() == 1000
    viewer.dims.set_point(0, image.data_to_world((10, 0, 0))[0])
    viewer.reset_view()
    _screenshot(viewer, tmp_path, "gui_segment.png")

    # ---- review & correct --------------------------------------------------------------
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review & correct")
    assert review.layer is labels
    history = review.session.history
    assert history.labels is labels.data
    before = labels.data.copy()

    labels.selected_label = 2
    labels.brush_size = 10
    labels.mode = "paint"
    labels.paint((5, 100, 100), 2, refresh=True)
    assert labels.data[5, 100, 100] == 2 and len(history) == 1
    painted = labels.data.copy()
    assert history.edit_log.edits[-1].kind == "paint"
    review.undo()
    np.testing.assert_array_equal(labels.data, before)
    review.redo()
    np.testing.assert_array_equal(labels.data, painted)

    labels.paint((9, 100, 100), 2, refresh=True)
    assert (review.slice_a.value(), review.slice_b.value(), review.label_spin.value()) == (5, 9, 2)
    assert review.interpolate()
    for z in (6, 7, 8):
        assert labels.data[z, 100, 100] == 2
    assert history.edit_log.edits[-1].kind == "interpolate"
    review.undo()
    assert labels.data[7, 100, 100] == before[7, 100, 100]
    review.redo()
    assert labels.data[7, 100, 100] == 2

    expected = next_slice_to_review(review.session.uncertainty, set(), axis=0)
    z = review.next_slice()
    assert z == expected and review.current_slice() == z
    assert review.mark_reviewed() == z
    assert review.next_slice() != z
    assert history.edit_log.reviewed_indices(0) == {z}
    review.save_now()
    assert review.session.autosave.path.is_file()
    _screenshot(viewer, tmp_path, "gui_review.png")

    # ---- export every format, read each back -------------------------------------------
    export = ExportWidget(viewer)
    for name in ("Segment", "Review & correct"):  # room for the export panel in the screenshot
        viewer.window._dock_widgets[name].hide()
    viewer.window.add_dock_widget(export, name="Export")
    assert export.selected_layer() is labels
    assert export.checks["dicom_seg"].isEnabled()
    assert export.table.rowCount() == 2 and export.table.item(1, 1).text() == "bone / contrast"
    out = tmp_path / "export"
    export.folder_edit.setText(str(out))
    for check in export.checks.values():
        check.setChecked(True)
    export.export()
    qtbot.waitUntil(lambda: export.worker is None, timeout=60_000)
    assert not export.last_errors, export.last_errors
    stem = export.stem_edit.text()
    source = read_volume(dicom_series)
    for ext in (".nii.gz", ".nrrd", ".mha"):
        back = read_volume(out / f"{stem}{ext}")
        np.testing.assert_array_equal(back.array, labels.data)
        np.testing.assert_allclose(back.geometry.spacing_zyx, source.geometry.spacing_zyx, atol=1e-6)
        np.testing.assert_allclose(back.geometry.zyx_affine(), source.geometry.zyx_affine(), atol=1e-5)
    import pydicom

    seg_ds = pydicom.dcmread(out / f"{stem}_seg.dcm")
    assert seg_ds.Modality == "SEG" and len(seg_ds.SegmentSequence) == 2
    rows = (out / f"{stem}_volumes.csv").read_text().splitlines()
    assert "ml" in rows[0].lower() and len(rows) == 3
    ml_2 = float(export.table.item(1, 2).text())
    voxel_ml = float(np.prod(source.geometry.spacing_zyx)) / 1000.0
    assert ml_2 == pytest.approx((labels.data == 2).sum() * voxel_ml, abs=0.01)
    meshes = sorted(p.name for p in (out / f"{stem}_meshes").iterdir())
    assert {"1_soft_tissue.stl", "2_bone_contrast.stl", "1_soft_tissue.obj", "2_bone_contrast.obj"} <= set(meshes)
    summary = json.loads((out / f"{stem}_summary.json").read_text())
    assert TINY in json.dumps(summary)
    _screenshot(viewer, tmp_path, "gui_export.png")
    review.shutdown()


def test_responsive_and_cancel(make_napari_viewer, qtbot, dicom_series: Path) -> None:
    from napari_medmamba._napari._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    _open_dicom(viewer, dicom_series)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg)
    n_layers = len(viewer.layers)
    # napari compiles its label-colour lookup once per process, and numba our CPU kernels once per install; the
    # widget does both in the background when it opens (a user picks a scan and a model meanwhile)
    assert seg.colormap_ready.wait(60)
    assert seg.cpu_kernels_ready.wait(120)

    # a slow model runs to the end while the event loop keeps ticking every 10 ms
    _segment(qtbot, seg, SLOW, timeout=60_000)
    assert seg.last_outcome == "done"
    gaps = seg.monitor.gaps_ms
    assert len(gaps) > 50, gaps  # the run lasted > 0.5 s and the timer kept firing
    # while the model runs (worker thread) the UI never freezes for 100 ms
    assert seg.run_stall_ms < 100, f"UI stalled {seg.run_stall_ms:.0f} ms while the model ran"
    # adding the two result layers is napari/vispy work on the UI thread: one short pause
    assert seg.add_result_s < 2.5, f"adding the result layers took {seg.add_result_s:.2f} s"
    print(f"\nmax stall during the run: {seg.run_stall_ms:.1f} ms over {len(gaps)} ticks; "
          f"adding the result layers: {1000 * seg.add_result_s:.0f} ms")
    assert len(viewer.layers) == n_layers + 2

    # cancel during inference: stops within 1 s, tells the user, adds nothing
    start = len(notification_manager.records)
    seg.model_combo.setCurrentText(SLOW)
    seg.run()
    qtbot.waitUntil(lambda: "Running model" in seg.progress.format(), timeout=20_000)
    qtbot.wait(300)
    t0 = time.perf_counter()
    seg.cancel()
    qtbot.waitUntil(lambda: not seg.running, timeout=5_000)
    assert time.perf_counter() - t0 < 1.0
    assert seg.last_outcome == "cancelled" and seg.cancel_latency_s < 1.0
    assert len(viewer.layers) == n_layers + 2
    assert any("cancelled" in m for m in _messages(start))
    assert seg.run_stall_ms < 100 and seg.monitor.max_stall_ms < 100
    print(f"cancel latency: {1000 * seg.cancel_latency_s:.0f} ms; max stall {seg.monitor.max_stall_ms:.1f} ms")


def test_cleanup_choice_reaches_the_engine(make_napari_viewer, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from napari_medmamba._napari._widgets.segment import CLEANUPS, SegmentWidget

    # a model whose recommended clean-up is the largest component of class 1 only (soft tissue)
    contract = dataclasses.replace(CONTRACT, target_spacing=None, patch_size=(16, 32, 32), largest_component_classes=(1,))
    monkeypatch.setitem(registry.REGISTRY, "cleanup_test", ModelSpec("cleanup_test", lambda: ThresholdNet(), contract, ""))
    scan = np.full((12, 32, 32), -1000.0, np.float32)
    scan[1:5, 2:10, 2:10] = 0.0  # soft tissue, 256 voxels
    scan[8:10, 2:4, 2:4] = 0.0  # a stray soft-tissue blob, 8 voxels
    scan[1:5, 20:28, 20:28] = 500.0  # bright, 256 voxels
    scan[8:10, 28:30, 28:30] = 500.0  # a second bright piece, 8 voxels
    viewer = make_napari_viewer()
    viewer.add_image(scan, name="scan")
    seg = SegmentWidget(viewer)
    assert list(CLEANUPS) == ["Recommended for this model", "None", "Largest component, every structure"]
    assert seg.cleanup_combo.currentText() == "Recommended for this model"  # the default
    seg.model_combo.setCurrentText("lightm_unet_3d_hn_oar")  # the tooltip says what happens to each organ
    tip = seg.cleanup_combo.toolTip()
    assert "largest connected piece of brainstem, right parotid, left parotid, larynx, mandible" in tip
    assert "spinal cord, esophagus left as predicted" in tip
    seg.model_combo.setCurrentText("unet_3d")
    assert "no clean-up" in seg.cleanup_combo.toolTip()
    expected = {"Recommended for this model": (256, 264), "None": (264, 264),
                "Largest component, every structure": (256, 256)}
    for choice, counts in expected.items():
        seg.cleanup_combo.setCurrentText(choice)
        _segment(qtbot, seg, "cleanup_test")
        assert seg.last_outcome == "done", _messages()
        data = np.asarray(seg.last_layer.data)
        assert (np.count_nonzero(data == 1), np.count_nonzero(data == 2)) == counts, choice
    meta = seg.last_layer.metadata["medmamba"]["segmentation"]
    assert meta["postprocess"] == "largest component of every class"


def test_2d_image_is_refused(make_napari_viewer, qtbot) -> None:
    from napari_medmamba._napari._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="photo")
    seg = SegmentWidget(viewer)
    start = len(notification_manager.records)
    seg.model_combo.setCurrentText(TINY)
    seg.run()
    assert not seg.running
    assert any("2D image" in m for m in _messages(start)), _messages(start)
    assert len(viewer.layers) == 1


def test_export_to_unwritable_folder(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    from napari_medmamba._napari._widgets.export import ExportWidget

    viewer = make_napari_viewer()
    data = np.zeros((8, 16, 16), np.uint8)
    data[2:5, 4:9, 4:9] = 1
    layer = viewer.add_labels(data, name="lesion", scale=(2.0, 0.5, 0.5))
    export = ExportWidget(viewer)
    assert not export.checks["dicom_seg"].isEnabled() and "DICOM" in export.dicom_note.text()
    assert export.table.rowCount() == 1
    assert float(export.table.item(0, 2).text()) == pytest.approx(75 * 0.5 / 1000, abs=0.005)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file, not a folder")
    export.folder_edit.setText(str(blocker / "sub"))
    start = len(notification_manager.records)
    export.export()
    qtbot.waitUntil(lambda: export.worker is None, timeout=10_000)
    assert export.last_errors and not export.last_written
    assert any("Cannot write to the folder" in m for m in _messages(start)), _messages(start)
    np.testing.assert_array_equal(layer.data, data)  # nothing lost
    assert export.export_button.isEnabled()


def test_autosave_restore(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    from napari_medmamba._napari._widgets.review import ReviewWidget

    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="organ")
    review = ReviewWidget(viewer)
    assert review.layer is layer and not review.restore_button.isEnabled()
    layer.brush_size = 6
    layer.paint((2, 10, 10), 3, refresh=True)
    painted = layer.data.copy()
    assert painted.sum() > 0
    review.interval_spin.setValue(5)
    assert review.session.autosave.interval_s == 5
    review.shutdown()  # closing the widget saves once more
    assert review.session is None

    # a new session on the same scan: labels lost, the autosave offers them back
    viewer.layers.remove(layer)
    fresh = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="organ")
    start = len(notification_manager.records)
    review2 = ReviewWidget(viewer)
    assert review2.layer is fresh and review2.restore_button.isEnabled()
    assert any("Restore autosaved edits" in m for m in _messages(start))
    assert review2.restore_autosave()
    np.testing.assert_array_equal(fresh.data, painted)
    assert review2.session.history.edit_log.edits[-1].kind == "paint"
    review2.shutdown()


def test_mirror_checkbox_follows_the_model_and_reaches_the_engine(make_napari_viewer, qtbot,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from napari_medmamba._napari._widgets import segment as segment_module
    from napari_medmamba._napari._widgets.segment import SegmentWidget

    contract = dataclasses.replace(CONTRACT, target_spacing=None, patch_size=(16, 32, 32), mirror_axes=(2,))
    monkeypatch.setitem(registry.REGISTRY, "mirror_test", ModelSpec("mirror_test", lambda: ThresholdNet(), contract, ""))
    seen: list[bool] = []
    real = segment_module.segment
    monkeypatch.setattr(segment_module, "segment", lambda *a, **k: seen.append(k["mirror"]) or real(*a, **k))
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).normal(size=(12, 32, 32)).astype(np.float32), name="scan")
    seg = SegmentWidget(viewer)
    assert seg.mirror_check.isEnabled() and not seg.mirror_check.isChecked()  # default model: offered, off
    seg.mirror_check.setChecked(True)
    seg.model_combo.setCurrentText("lightm_unet_3d_hn_oar")  # not measured for the CT model: not offered
    assert not seg.mirror_check.isEnabled() and not seg.mirror_check.isChecked()
    seg.model_combo.setCurrentText("mirror_test")
    seg.mirror_check.setChecked(True)
    _segment(qtbot, seg, "mirror_test")
    seg.mirror_check.setChecked(False)
    _segment(qtbot, seg, "mirror_test")
    assert seg.last_outcome == "done" and seen == [True, False]
