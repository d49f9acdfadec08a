"""The notebook viewer (napari_medmamba.notebook): Qt-free import, payload size, painting, undo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_medmamba.io import Geometry, Volume

pytest.importorskip("anywidget", reason="needs napari-medmamba[notebook]")

from napari_medmamba.notebook import view  # noqa: E402
from napari_medmamba.notebook._widget import extract_plane, plane_layout  # noqa: E402


def _volume(shape=(40, 96, 80), spacing=(0.8, 0.8, 2.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), modality="CT"):
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 100, size=shape).astype(np.int16)
    return Volume(array=arr, geometry=Geometry(spacing, (10.0, -20.0, 30.0), direction), modality=modality)


def test_import_is_qt_and_widget_free():
    code = (
        "import sys, napari_medmamba.notebook as nb\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'anywidget', 'ipywidgets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_anywidget_names_the_extra():
    code = (
        "import sys; sys.modules['anywidget'] = None\n"
        "import numpy as np\nfrom napari_medmamba.notebook import view\n"
        "try:\n    view(np.zeros((2, 3, 4)))\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install 'napari-medmamba[notebook]'" in out


def test_synced_payload_is_per_slice_not_per_volume():
    vol = _volume(shape=(60, 128, 112))
    w = view(vol, np.zeros(vol.shape, np.uint8))
    z, y, x = vol.shape
    per_plane = [(y * x), (z * x), (z * y)]
    expected = sum(n * (4 + 2) for n in per_plane)  # float32 image + uint16 labels per plane
    assert w.slice_payload_bytes() == expected
    state = w.get_state()
    from ipywidgets.widgets.widget import _remove_buffers

    _, _, buffers = _remove_buffers(state)
    total = sum(memoryview(b).nbytes for b in buffers)
    assert total == expected
    assert total < 0.2 * vol.array.size * 6  # far below one full transfer of image + labels

    sent = []
    w._send = lambda msg, buffers=None: sent.append(sum(memoryview(b).nbytes for b in (buffers or [])))
    w.position = [10, w.position[1], w.position[2]]  # move only the axial slice
    assert sent and max(sent) <= y * x * 6


def test_plane_orientation_lps_and_aspect():
    vol = _volume(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored, like NIfTI
    planes = plane_layout(vol)
    axial, coronal, sagittal = planes
    assert axial["normal"] == 0 and (axial["row_axis"], axial["col_axis"]) == (1, 2)
    assert axial["row_flip"] and axial["col_flip"]  # index +y is anterior: flip to show posterior down
    assert coronal["normal"] == 1 and coronal["row_mm"] == 2.5 and coronal["col_mm"] == 0.8
    assert sagittal["normal"] == 2 and sagittal["row_flip"]  # superior up
    sl = extract_plane(vol.array, coronal, 5)
    assert sl.shape == (vol.shape[0], vol.shape[2])
    assert sl[0, 0] == vol.array[-1, 5, -1]


def test_presets_ct_and_mr_auto():
    w = view(_volume(modality="CT"))
    assert {"CT soft tissue", "CT lung", "CT bone"} <= set(w.presets)
    assert (w.window_center, w.window_width) == (40.0, 400.0)
    mr = _volume(modality="MR")
    w2 = view(mr)
    lo, hi = np.percentile(mr.array, [1, 99])
    assert w2.preset == "MR auto"
    assert w2.window_width == pytest.approx(hi - lo)


def test_paint_message_goes_through_history_and_undo():
    vol = _volume()
    labels = np.zeros(vol.shape, np.uint8)
    w = view(vol, labels, label_names=["bg", "liver", "spleen"], label_colors=["#000000", "#ff0000", "#00ff00"])
    assert w.labels is labels  # edited in place
    assert w.label_names == {"1": "liver", "2": "spleen"} and w.label_colors["2"] == "#00ff00"
    idx = np.ravel_multi_index(([20, 20, 20], [48, 48, 49], [40, 41, 40]), vol.shape).astype("<u4")
    lab_before = w.lab_0
    w.handle_message({"type": "paint", "kind": "paint", "value": 2, "plane": 0}, [idx.tobytes()])
    assert int((labels == 2).sum()) == 3
    assert w.edit_log.summary()["edits_by_kind"]["paint"] == 1
    assert w.can_undo and w.lab_0 != lab_before  # the visible slice was resent
    w.handle_message({"type": "paint", "kind": "erase", "value": 0, "plane": 0}, [idx[:1].tobytes()])
    assert int((labels == 2).sum()) == 2
    w.history.undo()  # through the history directly: the widget follows
    assert int((labels == 2).sum()) == 3 and w.can_redo
    w.handle_message({"type": "undo"})
    assert labels.sum() == 0 and w.lab_0 == lab_before
    w.handle_message({"type": "redo"})
    assert int((labels == 2).sum()) == 3
    with pytest.raises(ValueError):
        w.handle_message({"type": "paint", "value": 1}, [np.array([vol.array.size], "<u4").tobytes()])
    w._on_custom_msg(w, {"type": "bogus"}, [])  # front-end errors are logged, never raised into the comm


def test_labels_copied_when_not_writable_and_shape_checked():
    vol = _volume(shape=(4, 5, 6))
    ro = np.zeros(vol.shape, np.uint8)
    ro.flags.writeable = False
    w = view(vol, ro)
    assert w.labels is not ro and w.labels.flags.writeable
    with pytest.raises(ValueError):
        view(vol, np.zeros((4, 5, 7), np.uint8))


def test_open_in_napari_without_display_is_clear(monkeypatch):
    from napari_medmamba.notebook import open_in_napari

    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    if not sys.platform.startswith("linux"):
        pytest.skip("display detection is Linux-only")
    with pytest.raises(RuntimeError, match="needs a display"):
        open_in_napari(_volume(shape=(4, 5, 6)))


def test_correction_example_and_resegment_keep_confirmed_voxels():
    torch = pytest.importorskip("torch")
    from napari_medmamba.models.registry import InputContract

    vol = _volume(shape=(6, 16, 12), modality="MR")
    labels = np.zeros(vol.shape, np.uint8)
    w = view(vol, labels)
    w.history.apply("paint", 1, indices=(np.array([2, 2]), np.array([3, 4]), np.array([5, 5])))
    w.history.accept_slice(0, 4)
    ex = w.correction_example()
    assert ex.volume is vol and ex.labels is not w.labels and np.array_equal(ex.labels, w.labels)
    w.history.accept_slice(0, 5)  # a snapshot: later edits do not reach the example
    assert ex.edit_log.reviewed_indices(0) == {4} and ex.edit_log.edited_mask[2, 3, 5]

    class Everything(torch.nn.Module):  # labels every voxel 1
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1)

    contract = InputContract(spatial_dims=3, in_channels=1, label_names=("background", "organ"),
                             label_colors=("#000000", "#ff0000"), patch_size=(4, 8, 8), orientation=None)
    confirmed = w.edit_log.reviewed_mask()
    before = w.labels.copy()
    result = w.resegment((Everything(), contract, "everything"), device="cpu")
    assert result.model_name == "everything" and w.result is result
    assert np.array_equal(w.labels[confirmed], before[confirmed])   # reviewed slices 4, 5 and the edits kept
    assert (w.labels[~confirmed] == 1).all()
    assert w.edit_log.edits[-1].kind == "model_run" and w.edit_log.reviewed_indices(0) == {4, 5}
    w.history.undo()
    assert np.array_equal(w.labels, before)
