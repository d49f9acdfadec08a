"""napari reader/writer/sample contributions: exact physical placement and round trips."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
sitk = pytest.importorskip("SimpleITK")

from napari.components import ViewerModel  # noqa: E402
from napari.layers import Image, Labels, Layer  # noqa: E402
from napari.utils.notifications import notification_manager  # noqa: E402

from napari_medmamba import samples  # noqa: E402
from napari_medmamba._napari._layers import METADATA_KEY, geometry_from_attributes, labels_layer_data  # noqa: E402
from napari_medmamba._napari._reader import get_reader  # noqa: E402
from napari_medmamba._napari._writer import write_labels_layer  # noqa: E402
from napari_medmamba.io import Geometry, read_volume  # noqa: E402

PLUGIN = "napari-medmamba"


@pytest.fixture(autouse=True)
def _plugin_discovered() -> None:
    """A headless ViewerModel does not run napari's plugin discovery; do it here."""
    import npe2

    manager = npe2.PluginManager.instance()
    manager.discover()
    assert PLUGIN in {m.name for m in manager.iter_manifests()}


def _oblique_direction() -> np.ndarray:
    """A rotation about two axes composed with a reflection (det -1)."""
    a, b = 0.4, -0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([-1.0, 1.0, 1.0])


def _write_synthetic(path: Path) -> sitk.Image:
    rng = np.random.default_rng(7)
    array = rng.normal(300, 80, size=(9, 11, 13)).astype(np.float32)  # z, y, x
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.75, 1.25, 2.5))
    image.SetOrigin((-12.5, 40.25, 7.125))
    image.SetDirection(tuple(_oblique_direction().ravel()))
    sitk.WriteImage(image, str(path))
    return sitk.ReadImage(str(path))  # what the file really stores (NIfTI rounds to float32)


def _read_layer(path: Path | str) -> Image:
    reader = get_reader(str(path))
    assert reader is not None, path
    (data, kwargs, layer_type), *rest = reader(str(path))
    assert not rest and layer_type == "image"
    return Image(data, **kwargs)


def _corners(shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    return [tuple(int(c) for c in corner) for corner in itertools.product(*[(0, n - 1) for n in shape])]


def _assert_world_is_physical(layer: Image, reference: sitk.Image) -> None:
    for index_zyx in _corners(layer.data.shape) + [tuple(n // 2 for n in layer.data.shape)]:
        world = np.asarray(layer.data_to_world(index_zyx), dtype=float)
        physical = np.asarray(reference.TransformIndexToPhysicalPoint(tuple(reversed(index_zyx))))[::-1]
        np.testing.assert_allclose(world, physical, atol=1e-6, rtol=0)


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-6, rtol=0, err_msg=get)


def _paint(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    z, y, x = (n // 2 for n in shape)
    labels[z, y:, x:] = 1
    labels[: z + 1, :2, :3] = 2  # asymmetric, so flips and axis swaps show up
    return labels


# --------------------------------------------------------------------------- reader


def test_reader_refuses_foreign_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "scan.1.2.3").write_bytes(b"\0" * 200)  # matches "*.[0-9]*" but is no DICOM
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "a.csv").write_text("1,2\n")
    for path in ["notes.txt", "scan.1.2.3", "picture.png", "empty", "other", "missing.nii.gz"]:
        assert get_reader(str(tmp_path / path)) is None, path
    assert get_reader([str(tmp_path / "notes.txt")]) is None
    assert get_reader("") is None and get_reader([]) is None and get_reader(None) is None  # type: ignore[arg-type]


def test_reader_ct_nifti_flipped_x_world_is_physical_mm(totalseg: Path) -> None:
    path = totalseg / "example_ct.nii.gz"
    reference = sitk.ReadImage(str(path))
    assert reference.GetDirection()[0] < 0  # the x axis is stored flipped
    layer = _read_layer(path)
    np.testing.assert_array_equal(layer.data, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(layer.scale, reference.GetSpacing()[::-1])
    _assert_world_is_physical(layer, reference)
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)  # soft-tissue window
    entry = layer.metadata[METADATA_KEY]
    assert Geometry.from_dict(entry["geometry"]).isclose(Geometry.from_sitk(reference), atol=0)
    assert entry["source"] == str(path)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_reader_oblique_anisotropic_world_is_physical_mm(tmp_path: Path, ext: str) -> None:
    reference = _write_synthetic(tmp_path / f"oblique{ext}")
    layer = _read_layer(tmp_path / f"oblique{ext}")
    np.testing.assert_allclose(layer.scale, (2.5, 1.25, 0.75))
    _assert_world_is_physical(layer, reference)
    low, high = layer.contrast_limits  # MR-like: percentiles of the data
    assert 0 < low < 300 < high < 700


# --------------------------------------------------------------------------- writer


@pytest.mark.parametrize("out_ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_ct_nifti(totalseg: Path, tmp_path: Path, out_ext: str) -> None:
    reference = sitk.ReadImage(str(totalseg / "example_ct.nii.gz"))
    image = _read_layer(totalseg / "example_ct.nii.gz")
    labels = Labels(_paint(image.data.shape), metadata=image.metadata)  # no transform: metadata only
    out = write_labels_layer(str(tmp_path / f"labels{out_ext}"), labels.data, labels._get_state())
    written = sitk.ReadImage(out[0])
    _assert_same_geometry(written, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels.data)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_oblique_via_viewer_save(tmp_path: Path, ext: str) -> None:
    reference = _write_synthetic(tmp_path / f"oblique{ext}")
    viewer = ViewerModel()
    (image,) = viewer.open(str(tmp_path / f"oblique{ext}"), plugin=PLUGIN)
    labels = viewer.add_labels(_paint(image.data.shape), metadata=image.metadata)
    saved = labels.save(str(tmp_path / f"labels{ext}"), plugin=PLUGIN)
    written = sitk.ReadImage(saved[0])
    _assert_same_geometry(written, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels.data)


def test_labels_layer_data_for_model_output(tmp_path: Path) -> None:
    """Labels computed in the core (e.g. a prediction) become a layer that saves on the grid."""
    reference = _write_synthetic(tmp_path / "oblique.nrrd")
    volume = read_volume(tmp_path / "oblique.nrrd")
    data, kwargs, layer_type = labels_layer_data(_paint(volume.shape), like=volume, name="prediction")
    assert layer_type == "labels"
    labels = Layer.create(data, kwargs, layer_type)
    image = _read_layer(tmp_path / "oblique.nrrd")
    np.testing.assert_allclose(labels.data_to_world((8, 10, 12)), image.data_to_world((8, 10, 12)))
    written = sitk.ReadImage(labels.save(str(tmp_path / "prediction.mha"), plugin=PLUGIN)[0])
    _assert_same_geometry(written, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), data)


@pytest.mark.parametrize("use_affine", [False, True])
def test_writer_falls_back_to_layer_transform(tmp_path: Path, use_affine: bool) -> None:
    """Labels without our metadata but sharing the image transform land on the same grid."""
    reference = _write_synthetic(tmp_path / "oblique.mha")
    geometry = Geometry.from_sitk(reference)
    image = _read_layer(tmp_path / "oblique.mha")
    if use_affine:
        labels = Labels(_paint(image.data.shape), affine=geometry.zyx_affine())
    else:
        labels = Labels(_paint(image.data.shape), scale=image.scale, translate=image.translate, rotate=image.rotate)
    assert METADATA_KEY not in labels.metadata
    assert geometry_from_attributes(labels._get_state(), labels.data.shape).isclose(geometry, atol=1e-9)
    out = write_labels_layer(str(tmp_path / "fallback.nrrd"), labels.data, labels._get_state())
    _assert_same_geometry(sitk.ReadImage(out[0]), reference)


def test_writer_refuses_sheared_layer(tmp_path: Path) -> None:
    labels = Labels(np.zeros((3, 4, 5), np.uint8), shear=(0.3, 0.0, 0.0))
    with pytest.raises(ValueError, match="shear"):
        write_labels_layer(str(tmp_path / "x.nii.gz"), labels.data, labels._get_state())
    assert not (tmp_path / "x.nii.gz").exists()


# --------------------------------------------------------------------------- broken input


@pytest.fixture
def notifications() -> list:
    received: list = []
    notification_manager.notification_ready.connect(received.append)
    yield received
    notification_manager.notification_ready.disconnect(received.append)


def test_broken_file_shows_error_and_adds_nothing(tmp_path: Path, notifications: list) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file" * 10)
    reader = get_reader(str(broken))
    assert reader is not None  # it is ours by extension, so we must report, not refuse
    assert reader(str(broken)) == [(None,)]
    viewer = ViewerModel()
    assert viewer.open(str(broken), plugin=PLUGIN) == []
    assert len(viewer.layers) == 0
    messages = [str(n.message) for n in notifications]
    assert len(messages) == 2 and all("broken.nii.gz" in m for m in messages), messages
    assert all(n.severity == "error" for n in notifications)


def test_rgb_nifti_is_reported_not_crashed(totalseg: Path, notifications: list) -> None:
    rgb = next(totalseg.rglob("spine_report.nii.gz"), None)
    if rgb is None:
        pytest.skip("spine_report.nii.gz not in the shared data")
    viewer = ViewerModel()
    assert viewer.open(str(rgb), plugin=PLUGIN) == []
    assert len(notifications) == 1 and "spine_report" in str(notifications[0].message)


# --------------------------------------------------------------------------- sample data


def test_mni152_sample() -> None:
    assert samples.list_samples() == ["mni152_t1", "mni152_t1_right_hippocampus"]  # nilearn is a dependency
    volume = samples.load_sample("mni152_t1")
    assert volume.shape == (189, 233, 197)
    assert volume.geometry.spacing == (1.0, 1.0, 1.0)
    assert volume.modality == "MR"
    assert volume.array.max() > 0
    viewer = ViewerModel()
    (layer,) = viewer.open_sample(PLUGIN, "mni152_t1")
    assert layer.data.shape == (189, 233, 197)
    np.testing.assert_allclose(layer.data_to_world((0, 0, 0)), volume.geometry.zyx_affine()[:3, 3])
    (crop,) = viewer.open_sample(PLUGIN, "mni152_t1_right_hippocampus")
    assert crop.data.shape == (36, 52, 36)
    np.testing.assert_allclose(crop.data_to_world((0, 0, 0)), crop.metadata["medmamba"]["geometry"]["origin"][::-1])


def test_sample_without_nilearn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = samples.importlib.util.find_spec
    monkeypatch.setattr(samples.importlib.util, "find_spec", lambda n, *a: None if n == "nilearn" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install nilearn"):
        samples.load_sample()
    with pytest.raises(KeyError, match="mni152_t1"):
        samples.sample_path("nope")


def test_label_maps_open_as_labels_layers(tmp_path: Path) -> None:
    """uint label maps named *label*/*seg*/*mask* open as Labels on the scan grid; others stay Images."""
    from napari_medmamba._napari._reader import read_layers
    from napari_medmamba.io import Geometry, Volume, write_labels, write_volume

    scan = Volume(np.zeros((4, 5, 6), np.int16), Geometry((0.5, 0.7, 2.0), (1.0, 2.0, 3.0)))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 2:4, 2:5] = 2
    seg = write_labels(labels, like=scan, path=tmp_path / "case_seg.nii.gz")
    img = write_volume(scan.with_array(labels), tmp_path / "case_t1.nii.gz")
    (data, kwargs, kind), = read_layers(str(seg))
    assert kind == "labels" and data.max() == 2
    np.testing.assert_allclose(kwargs["scale"], (2.0, 0.7, 0.5), rtol=1e-6)  # NIfTI stores float32
    assert read_layers(str(img))[0][2] == "image"


def test_ct_sample_entry_explains_how_to_open_ones_own_ct(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CT can ship offline: the sample menu's CT entry says, in one line, what to do (a notification and a
    text-only Points layer, since napari refuses a sample without layers)."""
    from napari.utils import notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_info", shown.append)
    viewer = ViewerModel()
    (layer,) = viewer.open_sample(PLUGIN, "ct_open_your_own")
    assert layer._type_string == "points" and len(layer.data) == 1 and "own CT" in layer.name
    assert "lightm_unet_3d_hn_oar" in str(layer.text.values)  # a constant string: one value for all points
    assert len(shown) == 1 and "\n" not in shown[0]
    assert "lightm_unet_3d_hn_oar" in shown[0] and "DICOM" in shown[0] and "napari-medmamba segment" in shown[0]
