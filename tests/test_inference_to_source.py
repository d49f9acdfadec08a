"""Working grid -> scan grid: separable linear interpolation, labels and entropy (inference/to_source.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medmamba.inference import to_source
from napari_medmamba.inference.preprocessing import resample_linear
from napari_medmamba.inference.to_source import axis_plan, to_source_grid
from napari_medmamba.io.volume import Geometry

FLIP = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _softmaxish(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    p = rng.random(shape).astype(np.float32) + 1e-3
    return p / p.sum(0, keepdims=True)


def test_matches_simpleitk_inside_the_grid() -> None:
    """Inside the working grid the result is SimpleITK's linear resampling (float16 rounding apart)."""
    rng = np.random.default_rng(0)
    work_zyx, scan_zyx = np.array([2.5, 4.0, 4.0]), np.array([1.5, 0.8, 0.7])
    probs = _softmaxish(rng, (4, 12, 9, 10))
    out_shape = tuple(int(round(n * w / s)) for n, w, s in zip(probs.shape[1:], work_zyx, scan_zyx))
    scan = Geometry(tuple(scan_zyx[::-1]), (10.0, -20.0, 5.0), FLIP)
    work = Geometry(tuple(work_zyx[::-1]), scan.origin, scan.direction)
    ref = np.stack([resample_linear(p, work, scan, out_shape) for p in probs])
    res = to_source_grid(probs, out_shape, tuple(scan_zyx / work_zyx))
    inside = [np.arange(n) * s <= m - 1 for n, s, m in zip(out_shape, scan_zyx / work_zyx, probs.shape[1:])]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    assert 0.5 < mask.mean() < 1.0
    diff = np.abs(ref - res.probabilities.astype(np.float32))
    assert diff[:, mask].max() < 1e-3
    # beyond the last voxel centre an axis is clamped: values stay within the data's range
    assert res.probabilities.min() >= probs.min() - 1e-3 and res.probabilities.max() <= probs.max() + 1e-3


def test_reproduces_linear_functions_and_clamps_edges() -> None:
    z, y, x = np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij")
    f = (z + 0.1 * y + 0.01 * x).astype(np.float32)
    res = to_source_grid(np.stack([f, 2 - f]), (6, 8, 10), (0.5, 0.5, 0.5), keep_probabilities=True)
    zo, yo, xo = np.meshgrid(np.minimum(np.arange(6) / 2, 2), np.minimum(np.arange(8) / 2, 3),
                             np.minimum(np.arange(10) / 2, 4), indexing="ij")
    exact = zo + 0.1 * yo + 0.01 * xo
    np.testing.assert_allclose(res.probabilities[0].astype(np.float32), exact, atol=2e-3)
    np.testing.assert_array_equal(res.labels, (2 - exact > exact).astype(np.uint8))


def test_labels_entropy_and_identity() -> None:
    rng = np.random.default_rng(1)
    probs = _softmaxish(rng, (3, 5, 6, 7))
    probs[:, 0, 0, 0] = [0.5, 0.5, 0.0]  # a tie: the first class wins, as np.argmax does
    probs[:, 0, 0, 1] = [1 / 3, 1 / 3, 1 / 3]
    probs[:, 0, 0, 2] = [0.0, 0.0, 1.0]
    res = to_source_grid(probs, probs.shape[1:], (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(res.probabilities, probs.astype(np.float16))
    np.testing.assert_array_equal(res.labels, np.argmax(probs, axis=0))
    h = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(0) / np.log(3)
    np.testing.assert_allclose(res.uncertainty.astype(np.float32), h, atol=2e-3)
    assert res.uncertainty[0, 0, 1] == pytest.approx(1.0, abs=1e-3) and res.uncertainty[0, 0, 2] == 0
    assert res.labels.dtype == np.uint8 and res.uncertainty.dtype == np.float16
    assert to_source_grid(probs, probs.shape[1:], (1.0, 1.0, 1.0), keep_probabilities=False).probabilities is None


def test_slabs_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = _softmaxish(np.random.default_rng(2), (2, 7, 8, 9))
    whole = to_source_grid(probs, (17, 20, 21), (0.4, 0.4, 0.45))
    monkeypatch.setitem(to_source.SLAB_ELEMENTS, "cpu", 1)  # one output slice per slab
    seen: list[float] = []
    sliced = to_source_grid(probs, (17, 20, 21), (0.4, 0.4, 0.45), progress=seen.append)
    np.testing.assert_array_equal(whole.probabilities, sliced.probabilities)
    np.testing.assert_array_equal(whole.labels, sliced.labels)
    assert len(seen) == 17 and seen == sorted(seen) and seen[-1] == 1.0


@pytest.mark.parametrize("scale", [(1.0, 0.5, 0.5), (0.5, 1.0, 0.5), (0.5, 0.5, 1.0)])
def test_an_unchanged_axis_next_to_resampled_ones(monkeypatch: pytest.MonkeyPatch, scale: tuple[float, ...]) -> None:
    """Same spacing along one axis (e.g. z of a CT already at the working slice thickness), several slabs."""
    monkeypatch.setitem(to_source.SLAB_ELEMENTS, "cpu", 3 * 12 * 12 * 2)
    probs = _softmaxish(np.random.default_rng(3), (3, 10, 6, 6))
    shape = tuple(int(round(n / s)) for n, s in zip(probs.shape[1:], scale))
    res = to_source_grid(probs, shape, scale)
    assert res.labels.shape == shape
    kept = scale.index(1.0)
    every_other = [slice(None, None, 2) if k != kept else slice(None) for k in range(3)]
    np.testing.assert_array_equal(res.probabilities[(slice(None), *every_other)], probs.astype(np.float16))


def test_cancel_stops_between_slabs() -> None:
    class Stop(Exception):
        pass

    def cancel() -> None:
        raise Stop

    with pytest.raises(Stop):
        to_source_grid(np.ones((2, 3, 3, 3), np.float32) / 2, (6, 6, 6), (0.5, 0.5, 0.5), cancel=cancel)


def test_axis_plan() -> None:
    plan = axis_plan(5, 3, 0.6)
    np.testing.assert_array_equal(plan.lower.numpy(), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(plan.upper.numpy(), [1, 1, 2, 2, 2])
    np.testing.assert_allclose(plan.weight.numpy(), [0, 0.6, 0.2, 0.8, 0], atol=1e-6)
    assert axis_plan(4, 4, 1.0).identity and not axis_plan(4, 4, 0.99).identity


@pytest.mark.parametrize("flip", [(True, False, False), (False, True, True), (True, True, True)])
@pytest.mark.parametrize("scale", [(0.4, 0.5, 0.45), (1.0, 1.0, 1.0), (1.0, 0.5, 0.5)])
def test_flips_inside_the_interpolation_equal_flipping_afterwards(monkeypatch: pytest.MonkeyPatch,
                                                                  flip: tuple[bool, ...], scale: tuple[float, ...]) -> None:
    """An orientation's flips undone during the interpolation: bit-identical to np.flip of the result."""
    monkeypatch.setitem(to_source.SLAB_ELEMENTS, "cpu", 3 * 9 * 10 * 3)  # several slabs
    probs = _softmaxish(np.random.default_rng(4), (3, 7, 5, 6))
    shape = tuple(int(round(n / s)) for n, s in zip(probs.shape[1:], scale))
    plain = to_source_grid(probs, shape, scale)
    flipped = to_source_grid(probs, shape, scale, flip_zyx=flip)
    axes = tuple(a for a in range(3) if flip[a])
    np.testing.assert_array_equal(flipped.labels, np.flip(plain.labels, axes))
    np.testing.assert_array_equal(flipped.uncertainty, np.flip(plain.uncertainty, axes))
    np.testing.assert_array_equal(flipped.probabilities, np.flip(plain.probabilities, tuple(a + 1 for a in axes)))


def test_more_than_256_classes_give_uint16_labels() -> None:
    """Labels beyond 255 survive the narrowing on the device (uint16 output, no wrap-around)."""
    classes, shape = 300, (3, 4, 5)
    winners = np.array([0, 255, 256, 299, 1, 298])
    flat = np.full((classes, int(np.prod(shape))), 1e-4, dtype=np.float32)
    for i in range(flat.shape[1]):
        flat[winners[i % len(winners)], i] = 1.0
    probs = (flat / flat.sum(0, keepdims=True)).reshape(classes, *shape)
    res = to_source_grid(probs, shape, (1.0, 1.0, 1.0))
    assert res.labels.dtype == np.uint16
    np.testing.assert_array_equal(res.labels.ravel(), winners[np.arange(flat.shape[1]) % len(winners)])
    assert res.probabilities.shape == (classes, *shape) and res.uncertainty.dtype == np.float16
