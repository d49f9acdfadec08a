"""Body crop of CT scans: the box, the engine tiling only it, training tiles cut the same way."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from napari_medmamba.inference import segment
from napari_medmamba.inference.body_crop import body_box
from napari_medmamba.io.volume import Geometry, Volume
from test_inference_support import ThresholdNet, contract


def _ct(shape=(40, 96, 96), body=(slice(10, 30), slice(30, 60), slice(20, 50))) -> np.ndarray:
    ct = np.full(shape, -1000.0, np.float32)
    ct[body] = 40.0
    return ct


def test_box_has_the_margin_and_the_multiple() -> None:
    box = body_box(_ct(), -500, spacing_zyx=(2.5, 4.0, 4.0), margin_mm=8.0, multiple=8)
    # body z 10..30 + ceil(8/2.5)=4 -> 6..34 (28) -> 32; y 30..60 + 2 -> 28..62 (34) -> 40; x 20..50 -> 18..52 -> 40
    assert [(s.start, s.stop) for s in box] == [(4, 36), (25, 65), (15, 55)]


def test_box_stays_inside_the_image_and_keeps_every_large_piece() -> None:
    ct = _ct(body=(slice(0, 40), slice(0, 20), slice(0, 20)))
    ct[5:35, 70:90, 70:90] = 40.0  # a second piece of the body (a head held apart by a mask)
    ct[2, 2, 90] = 500.0  # a speck of noise: ignored
    box = body_box(ct, -500, (2.5, 4.0, 4.0), margin_mm=0.0, multiple=16)
    assert [(s.start, s.stop) for s in box] == [(0, 40), (0, 96), (0, 96)]
    speck_only = np.full((8, 8, 8), -1000.0, np.float32)
    assert body_box(speck_only, -500, (1, 1, 1)) is None


class _ShapeSpy(nn.Module):
    """ThresholdNet that records the tile shapes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ThresholdNet(threshold=-1.0)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        return self.net(x)


def test_engine_tiles_only_the_body_and_calls_the_rest_background() -> None:
    ct = _ct()
    body = ct > -500
    ct[0, 0, 0] = 3000.0  # outside the body but bright: would be foreground if it were segmented (a speck: no body)
    volume = Volume(ct, Geometry((4.0, 4.0, 2.5), (0.0, 0.0, 0.0)), modality="CT")
    kw = dict(normalization="ct", ct_window=(-1000.0, 1000.0), ct_stats=(0.0, 500.0), orientation=None,
              patch=(16, 64, 64), max_tile_growth=1.0)
    spy = _ShapeSpy()
    cropped = segment(volume, (spy, contract(body_threshold_hu=-500.0, **kw)), device="cpu")
    whole = segment(volume, (ThresholdNet(threshold=-1.0), contract(**kw)), device="cpu")
    assert (cropped.labels.array[body] == 1).all() and (whole.labels.array[body] == 1).all()
    assert cropped.labels.array[0, 0, 0] == 0 and whole.labels.array[0, 0, 0] == 1
    assert (cropped.uncertainty[0, :5, :5] == 0).all() and cropped.probabilities[0, 0, 0, 0] == 1.0
    # the box (with its 12 mm margin, to multiples of 1) is one tile: z 20 + 2x5 = 30 slices fit 16 x (1 + 1.0)
    assert spy.shapes == [(30, 36, 36)]


def test_training_cuts_cases_as_the_engine_does_and_pads_batches_with_air() -> None:
    from napari_medmamba.models import get_model_spec
    from napari_medmamba.training.augment import PatchSampler
    from napari_medmamba.training.dataset import CachedCases

    con = get_model_spec("lightm_unet_3d_hn_oar").contract
    mean, std = con.ct_stats
    small, large = _ct(), _ct(shape=(80, 160, 160), body=(slice(5, 75), slice(20, 140), slice(10, 150)))
    norm = [((np.clip(a, *con.ct_window) - mean) / std).astype(np.float16) for a in (small, large)]
    labels = [(a > -500).astype(np.uint8) for a in (small, large)]
    cases = CachedCases(["s", "l"], norm, labels, {}).cropped_to_body(con, 8)
    expected = body_box(small, con.body_threshold_hu, con.target_spacing, multiple=8)
    assert cases.images[0].shape == tuple(s.stop - s.start for s in expected) == (32, 40, 40)
    air = float(norm[0].min())
    sampler = PatchSampler(cases.images, cases.labels, con.patch_size, pad_value=air, cap_multiple=8)
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(12):
        x, y, idx = sampler.sample_with_cases(2, rng)
        want = tuple(min(p, max(-(-cases.images[i].shape[a] // 8) * 8 for i in idx))
                     for a, p in enumerate(con.patch_size))
        assert x.shape[2:] == want and y.shape[1:] == want
        shapes.add(want)
        if set(idx.tolist()) == {0, 1}:  # the small case is padded with air, labelled background
            k = int(np.flatnonzero(idx == 0)[0])
            assert np.isclose(x[k, 0, -1, -1, -1], air, atol=1e-2) and y[k, -1, -1, -1] == 0
    assert (32, 40, 40) in shapes and (64, 128, 128) in shapes


def test_trainer_samples_ct_contracts_from_body_boxes_and_mr_contracts_whole() -> None:
    from napari_medmamba.models import get_model_spec
    from napari_medmamba.training.dataset import CachedCases
    from napari_medmamba.training.trainer import _patch_sampler

    ct = get_model_spec("lightm_unet_3d_hn_oar").contract
    mean, std = ct.ct_stats
    image = ((np.clip(_ct(), *ct.ct_window) - mean) / std).astype(np.float16)
    cases = CachedCases(["s"], [image], [np.zeros(image.shape, np.uint8)], {})
    sampler = _patch_sampler(cases, ct, ct.patch_size, 8)
    assert sampler.images[0].shape == (32, 40, 40) and sampler.cap_multiple == 8
    assert np.isclose(sampler.pad_value, float(image.min()))  # air
    whole = _patch_sampler(cases, get_model_spec("lightm_unet_3d").contract, (16, 16, 16), 8)
    assert whole.images[0].shape == image.shape and whole.cap_multiple is None and whole.pad_value == 0.0
