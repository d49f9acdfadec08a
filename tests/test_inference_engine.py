"""segment(): exact geometry, correct placement, modes, progress, cancel, determinism, bad input."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.spatial.transform import Rotation

from napari_medmamba.inference import Postprocess, SegmentationCancelled, SegmentationInputError, segment
from napari_medmamba.io import read_volume
from napari_medmamba.io.volume import Geometry, Volume
from test_inference_support import ThresholdNet, TinyUNet, contract

STAGES = ["preprocess", "inference", "resample", "postprocess"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _oblique_sphere(noise: float = 0.0) -> tuple[Volume, np.ndarray]:
    """An anisotropic, obliquely oriented scan of an off-centre 12 mm sphere, and the sphere's voxel mask."""
    direction = Rotation.from_euler("xyz", [20, -15, 160], degrees=True).as_matrix()
    geometry = Geometry((0.7, 0.9, 2.2), (-10.0, 25.0, 40.0), tuple(direction.reshape(-1)))
    shape = (24, 40, 44)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape[::-1]], indexing="ij"), -1)  # (x, y, z, 3)
    physical = idx @ (geometry.direction_matrix @ np.diag(geometry.spacing)).T + geometry.origin
    centre = geometry.direction_matrix @ (np.asarray(geometry.spacing) * (np.array(shape[::-1]) - 1) * np.array([0.45, 0.42, 0.35])) + geometry.origin
    inside = (np.linalg.norm(physical - centre, axis=-1) < 12.0).transpose(2, 1, 0)  # (z, y, x)
    rng = np.random.default_rng(7)
    array = (100.0 * inside + noise * rng.normal(size=shape)).astype(np.float32)
    return Volume(array, geometry, modality="MR"), inside


def _threshold_between(array: np.ndarray, value: float) -> float:
    """``value`` in per-volume z-score units (what ThresholdNet sees)."""
    return float((value - array.mean(dtype=np.float64)) / array.std(dtype=np.float64))


@pytest.mark.parametrize("mode", ["accurate", "fast"])
def test_oblique_anisotropic_output_is_on_the_input_grid_and_in_place(mode: str) -> None:
    volume, truth = _oblique_sphere()
    net = ThresholdNet(threshold=_threshold_between(volume.array, 50.0))
    result = segment(volume, (net, contract(target_spacing=(1.5, 1.5, 1.5))), device="cpu", mode=mode)
    assert result.labels.geometry.isclose(volume.geometry, atol=1e-6) and result.labels.shape == volume.shape
    assert result.labels.array.dtype == np.uint8
    assert result.probabilities.shape == (2, *volume.shape) and result.probabilities.dtype == np.float16
    assert result.uncertainty.shape == volume.shape and 0 <= result.uncertainty.min() <= result.uncertainty.max() <= 1
    np.testing.assert_allclose(result.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-3)
    assert _dice(result.labels.array == 1, truth) > (0.9 if mode == "accurate" else 0.85)
    assert set(result.timings) >= {*STAGES, "forward", "total"} and result.device == "cpu"


@pytest.mark.parametrize("orientation", ["RAS", "SAR", "LPI", None])
def test_without_resampling_the_round_trip_is_exact(orientation: str | None) -> None:
    volume, _ = _oblique_sphere(noise=30.0)
    t = _threshold_between(volume.array, 50.0)
    result = segment(volume, (ThresholdNet(threshold=t), contract(orientation=orientation)), device="cpu")
    np.testing.assert_array_equal(result.labels.array, (volume.array > 50.0).astype(np.uint8))


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_models_run_slice_by_slice_along_the_contract_axis(slice_axis: int) -> None:
    volume, _ = _oblique_sphere(noise=30.0)
    t = _threshold_between(volume.array, 50.0)
    c = contract(2, (16, 16), orientation=None, slice_axis=slice_axis)
    result = segment(volume, (ThresholdNet(2, threshold=t), c), device="cpu")
    np.testing.assert_array_equal(result.labels.array, (volume.array > 50.0).astype(np.uint8))


def test_real_flipped_ct_nifti(totalseg) -> None:
    volume = read_volume(totalseg / "example_ct.nii.gz")
    ct = contract(patch=(32, 32, 32), orientation="LPS", target_spacing=(4.0, 4.0, 4.0), normalization="ct",
                  ct_window=(-1000.0, 1000.0), ct_stats=(0.0, 1000.0), modality="CT")
    result = segment(volume, (ThresholdNet(threshold=-0.3), ct), device="cpu", mode="fast")
    assert result.labels.geometry.isclose(volume.geometry, atol=1e-6) and result.labels.shape == volume.shape
    assert _dice(result.labels.array == 1, volume.array > -300) > 0.9
    assert not result.warnings


def test_real_dicom_series(dicom_series) -> None:
    volume = read_volume(dicom_series)
    ct = contract(patch=(16, 64, 64), orientation="RAS", target_spacing=(3.0, 2.0, 2.0), normalization="ct",
                  ct_window=(-1000.0, 1000.0), ct_stats=(0.0, 1000.0), modality="CT")
    result = segment(volume, (ThresholdNet(threshold=-0.3), ct), device="cpu", return_probabilities=False)
    assert result.labels.geometry.isclose(volume.geometry, atol=1e-6) and result.labels.shape == (20, 512, 512)
    assert result.probabilities is None
    assert _dice(result.labels.array == 1, volume.array > -300) > 0.95


def test_progress_is_monotonic_and_reaches_one() -> None:
    volume, _ = _oblique_sphere()
    calls: list[tuple[float, str]] = []
    # 8^3 patches: several tiles (a volume at most 25% over a 16^3 patch would run as one grown tile)
    segment(volume, (TinyUNet(), contract(target_spacing=(2.0, 2.0, 2.0), patch=(8, 8, 8))), device="cpu",
            postprocess=Postprocess(largest_component=True), progress=lambda f, s: calls.append((f, s)))
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] == 1.0
    stages = [s for _, s in calls]
    assert sorted(set(stages), key=stages.index) == STAGES
    assert len([s for s in stages if s == "inference"]) >= 2


class _Slow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x


class SlowNet(nn.Module):
    """About 2 s per tile, spread over 40 layers (each checked for cancellation)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[_Slow() for _ in range(40)])
        self.head = ThresholdNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def test_cancel_with_an_event_is_honoured_within_one_second_even_inside_a_tile() -> None:
    volume, _ = _oblique_sphere()
    event = threading.Event()
    set_at: list[float] = []

    def set_later() -> None:
        time.sleep(0.5)
        set_at.append(time.perf_counter())
        event.set()

    threading.Thread(target=set_later, daemon=True).start()
    with pytest.raises(SegmentationCancelled):
        segment(volume, (SlowNet(), contract(patch=(24, 40, 44), orientation=None)), device="cpu", cancel=event)
    latency = time.perf_counter() - set_at[0]
    assert latency < 1.0, f"cancel took {latency:.2f} s"


def test_cancel_callable_stops_before_inference() -> None:
    volume, _ = _oblique_sphere()
    stages: list[str] = []
    with pytest.raises(SegmentationCancelled):
        segment(volume, (TinyUNet(), contract()), device="cpu", cancel=lambda: "preprocess" in stages,
                progress=lambda f, s: stages.append(s))
    assert stages and "inference" not in stages


def test_cpu_results_are_deterministic_and_threads_restored() -> None:
    volume, _ = _oblique_sphere(noise=20.0)
    threads = torch.get_num_threads()
    runs = [segment(volume, (TinyUNet(seed=3), contract(target_spacing=(1.7, 1.3, 1.1))), device="cpu") for _ in range(2)]
    np.testing.assert_array_equal(runs[0].labels.array, runs[1].labels.array)
    np.testing.assert_array_equal(runs[0].probabilities, runs[1].probabilities)
    np.testing.assert_array_equal(runs[0].uncertainty, runs[1].uncertainty)
    assert len(np.unique(runs[0].labels.array)) == 2  # a non-trivial map
    assert torch.get_num_threads() == threads


def test_fast_mode_uses_fewer_forward_passes() -> None:
    volume, _ = _oblique_sphere()
    counts = {}
    for mode in ("accurate", "fast"):
        calls: list[float] = []
        segment(volume, (TinyUNet(), contract(patch=(16, 16, 16), target_spacing=(1.0, 1.0, 1.0))), device="cpu",
                mode=mode, progress=lambda f, s: calls.append(f) if s == "inference" else None)
        counts[mode] = len(calls)
    assert counts["fast"] * 4 < counts["accurate"]


def test_postprocess_is_applied_on_the_source_grid() -> None:
    volume, truth = _oblique_sphere()
    array = volume.array.copy()
    array[0, 0, 0] = 100.0  # a one-voxel island far from the sphere
    volume = volume.with_array(array)
    net = ThresholdNet(threshold=_threshold_between(array, 50.0))
    raw = segment(volume, (net, contract(orientation=None)), device="cpu")
    cleaned = segment(volume, (net, contract(orientation=None)), device="cpu", postprocess=Postprocess(largest_component=True))
    assert raw.labels.array[0, 0, 0] == 1 and cleaned.labels.array[0, 0, 0] == 0
    np.testing.assert_array_equal(cleaned.labels.array == 1, truth)


@pytest.mark.parametrize(
    "make_input,make_contract,message",
    [
        (lambda a: a[None], lambda: contract(), "4D"),
        (lambda a: a[0], lambda: contract(), "2D image"),
        (lambda a: a, lambda: contract(in_channels=2), "2 input channels"),
        (lambda a: a[:0], lambda: contract(), "empty"),
        (lambda a: np.full_like(a, 7.0), lambda: contract(), "nothing to segment"),
        (lambda a: np.where(a > 50, np.nan, a), lambda: contract(), "NaN"),
        (lambda a: np.where(a > 50, np.inf, a), lambda: contract(), "NaN or infinite"),
        (lambda a: a[:1], lambda: contract(), "single 2D slice"),
        (lambda a: a, lambda: contract(patch=(15, 16, 16)), "not divisible by the model's stride"),
        (lambda a: a.astype(np.complex64), lambda: contract(), "cannot be segmented"),
    ],
)
def test_bad_input_raises_a_clear_error(make_input, make_contract, message: str) -> None:
    volume, _ = _oblique_sphere()
    with pytest.raises(SegmentationInputError, match=message):
        segment(make_input(volume.array), (TinyUNet(), make_contract()), device="cpu")


def test_model_returning_the_wrong_shape_is_a_clear_error() -> None:
    volume, _ = _oblique_sphere()
    with pytest.raises(SegmentationInputError, match="3 classes"):
        segment(volume, (TinyUNet(classes=2), contract(classes=3)), device="cpu")


def test_modality_mismatch_is_a_warning() -> None:
    volume, _ = _oblique_sphere()
    result = segment(volume, (ThresholdNet(), contract(modality="CT")), device="cpu", mode="fast")
    assert any("trained on CT" in w for w in result.warnings)


def test_bf16_on_the_cpu_changes_precision_not_the_result() -> None:
    volume, _ = _oblique_sphere(noise=20.0)
    model = (TinyUNet(seed=5), contract(target_spacing=(2.0, 2.0, 2.0)))
    fp32 = segment(volume, model, device="cpu", mode="fast")
    bf16 = segment(volume, model, device="cpu", mode="fast", precision="bf16")
    assert not np.array_equal(fp32.probabilities, bf16.probabilities)  # autocast really ran in bf16
    np.testing.assert_allclose(fp32.probabilities, bf16.probabilities, atol=0.05)
    with pytest.raises(ValueError):
        segment(volume, model, device="cpu", precision="fp16")


class _LeftRightNet(nn.Module):
    """Ignores the image: class 1 on the low-x half of every tile, class 2 on the high-x half (position only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-4.0, 4.0, x.shape[-1]).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.full_like(ramp, -8.0), -ramp, ramp], dim=1)


def test_cpu_mirroring_runs_tiles_and_mirror_images_as_one_batch(monkeypatch) -> None:
    """On a CPU the tiles and their mirror images go through the network together (when the batch stays under
    CPU_BATCH_VOXELS), with the same probabilities as one forward per mirror axis."""
    from napari_medmamba.inference import engine

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    batches = []
    net.register_forward_pre_hook(lambda m, i: batches.append(i[0].shape[0]))
    volume = Volume(np.random.default_rng(1).normal(size=(8, 8, 16)).astype(np.float32),
                    Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    model = (net, contract(classes=3, patch=(8, 8, 16), orientation=None, mirror_axes=(0, 2)))
    together = segment(volume, model, device="cpu", mirror=True)
    assert batches == [3]  # the tile and its two mirror images
    batches.clear()
    monkeypatch.setattr(engine, "CPU_BATCH_VOXELS", 0)
    apart = segment(volume, model, device="cpu", mirror=True)
    assert batches == [1, 1, 1]
    np.testing.assert_allclose(together.probabilities, apart.probabilities, atol=1e-3)
    np.testing.assert_array_equal(together.labels.array, apart.labels.array)


def test_mirroring_averages_mirror_images_and_swaps_left_right_pairs_back() -> None:
    volume = Volume(np.random.default_rng(0).normal(size=(8, 8, 16)).astype(np.float32), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    kw = dict(classes=3, patch=(8, 8, 16), orientation=None, mirror_axes=(2,))
    plain = segment(volume, (_LeftRightNet(), contract(**kw)), device="cpu")
    assert (plain.labels.array[..., :8] == 1).all() and (plain.labels.array[..., 8:] == 2).all()
    # without a pair, the mirror image says the opposite: the average is a tie between 1 and 2 everywhere
    tie = segment(volume, (_LeftRightNet(), contract(**kw)), device="cpu", mirror=True)
    np.testing.assert_allclose(tie.probabilities[1], tie.probabilities[2], atol=1e-3)
    # declared as a left-right pair (a right and a left organ), the mirrored prediction is swapped back: it agrees
    paired = segment(volume, (_LeftRightNet(), contract(lr_label_pairs=((1, 2),), **kw)), device="cpu", mirror=True)
    np.testing.assert_array_equal(paired.labels.array, plain.labels.array)
    np.testing.assert_allclose(paired.probabilities, plain.probabilities, atol=1e-3)
