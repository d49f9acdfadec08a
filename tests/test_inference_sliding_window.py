"""Window placement, Gaussian weights and exact blending of the sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medmamba.inference.sliding_window import gaussian_importance, sliding_window, tile_grid, tile_starts


def test_gaussian_importance_peaks_in_the_centre() -> None:
    w = gaussian_importance((5, 8, 9)).numpy()
    assert w.shape == (5, 8, 9) and w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[2, 3, 4] == w.max() and w[0, 0, 0] == w.min()
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])
    assert gaussian_importance((1, 4, 4)).shape == (1, 4, 4)


@pytest.mark.parametrize("size,patch,overlap", [(10, 10, 0.5), (11, 4, 0.5), (100, 32, 0.25), (33, 16, 0.0), (7, 3, 0.9)])
def test_tile_starts_cover_the_axis(size: int, patch: int, overlap: float) -> None:
    starts = tile_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert all(b - a <= patch for a, b in zip(starts, starts[1:]))  # no gaps
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


def test_more_overlap_means_more_tiles() -> None:
    assert len(tile_grid((100, 64, 64), (32, 32, 32), 0.5)) > len(tile_grid((100, 64, 64), (32, 32, 32), 0.25))


def _pointwise(batch: torch.Tensor) -> torch.Tensor:
    """Probabilities that depend only on each voxel's value: blending must reproduce them exactly."""
    return torch.softmax(torch.cat([torch.zeros_like(batch), batch, -batch], dim=1), dim=1)


@pytest.mark.parametrize("shape", [(9, 20, 13), (3, 5, 6), (1, 40, 7)])
def test_blending_is_exact_for_a_pointwise_predictor(shape: tuple[int, int, int]) -> None:
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32))
    sizes: list[int] = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return _pointwise(batch)

    seen: list[float] = []
    probs = sliding_window(image, predict, lambda: 3, (1, 8, 8) if shape[0] == 1 else (4, 8, 8), 0.5, 3, seen.append)
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs, _pointwise(image[None])[0], atol=1e-6, rtol=0)
    assert max(sizes) <= 3 and seen[-1] == 1.0 and seen == sorted(seen)


def test_overlap_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError):
        sliding_window(torch.zeros(1, 4, 4, 4), _pointwise, lambda: 1, (4, 4, 4), 1.0, 3)


def test_tile_for_caps_the_patch_to_the_volume() -> None:
    from napari_medmamba.inference.sliding_window import tile_for

    assert tile_for((36, 33, 32), (64, 128, 128), 8) == (40, 40, 32)  # rounded up to the stride, not padded to 128
    assert tile_for((200, 300, 300), (64, 128, 128), 8) == (64, 128, 128)  # large volumes: the patch
    assert tile_for((3, 5, 9), (64, 128, 128), 8) == (16, 16, 16)  # never under two strides


def test_engine_tiles_follow_the_contract_padding_policy() -> None:
    """Shipped models see the full patch (as trained); fine-tuned contracts (pad_to_patch=False) see tiles capped
    to the volume, as fine-tuning trains them."""
    import dataclasses

    import numpy as np
    import torch

    from napari_medmamba.inference import segment
    from napari_medmamba.models import get_model_spec

    class Recorder(torch.nn.Module):
        stride = 8

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shapes: list[tuple[int, ...]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.shapes.append(tuple(x.shape[2:]))
            return torch.zeros(x.shape[0], 3, *x.shape[2:]) + self.w

    base = dataclasses.replace(get_model_spec("lightm_unet_3d").contract, target_spacing=None, orientation=None)
    volume = np.random.default_rng(0).normal(size=(12, 20, 9)).astype(np.float32)
    for contract, expected in ((base, (40, 56, 40)), (dataclasses.replace(base, pad_to_patch=False), (16, 24, 16))):
        net = Recorder()
        segment(volume, (net, contract, "rec"), device="cpu", return_probabilities=False)
        assert set(net.shapes) == {expected}


def test_tile_with_slack_grows_only_slightly_larger_axes() -> None:
    from napari_medmamba.inference.sliding_window import tile_with_slack

    patch = (40, 56, 40)
    assert tile_with_slack((35, 51, 35), patch, 8) == patch  # smaller: padded up to the patch as trained
    assert tile_with_slack((43, 44, 39), patch, 8) == (48, 56, 40)  # 3 voxels over: one grown tile, not two
    assert tile_with_slack((41, 58, 32), patch, 8) == (48, 64, 40)
    assert tile_with_slack((51, 56, 40), patch, 8) == patch  # over 25% larger: sliding window with the patch
    assert tile_with_slack((50, 70, 50), patch, 8) == (56, 72, 56)  # exactly 25% over: still one tile
