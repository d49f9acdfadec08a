"""Scan-call shapes and FLOPs recorded on the meta device."""

from __future__ import annotations

import torch

from napari_medmamba.models import REGISTRY, build_model
from napari_medmamba.models.mamba import scan_override
from napari_medmamba.models.scan_shapes import (lightm_unet_3d_scan_shapes, model_flops, model_scan_shapes,
                                                scan_calls, scan_flops)


def _lightm_expected(spatial: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    n = 1
    for s in spatial:
        n *= s
    out = []
    for level, blocks in enumerate((1, 2, 2, 4)):
        L = n // 8 ** level if len(spatial) == 3 else n // 4 ** level
        if level > 0:  # downsampling MambaLayer runs at the finer level, on the narrower width
            Lf = L * (8 if len(spatial) == 3 else 4)
            out.append((1, 2 * 32 * 2 ** (level - 1), Lf, 16))
        out += [(1, 2 * 32 * 2 ** level, L, 16)] * (2 * blocks)
    return out


def test_every_registered_model_listed() -> None:
    shapes = model_scan_shapes()
    assert set(shapes) == set(REGISTRY)
    assert shapes["unet_3d"] == []
    assert sorted(shapes["lightm_unet_3d"]) == sorted(_lightm_expected((40, 56, 40)))
    assert sorted(shapes["lightm_unet_2d"]) == sorted(_lightm_expected((56, 40)))
    mhs = shapes["mhs_vm_2d"]  # 64x64 -> 16x16 tokens; 4 heads x 4 routes per block; widths 48/96/192/384
    assert len(mhs) == 4 * (2 + 2 + 2 + 2 + 2 + 2 + 2 + 1)
    assert set(mhs) == {(1, 48, 256, 16), (1, 96, 64, 16), (1, 192, 16, 16), (1, 384, 4, 16)}


def test_official_patch() -> None:
    s = lightm_unet_3d_scan_shapes()
    assert sorted(s) == sorted(_lightm_expected((128, 128, 128)))
    assert (1, 64, 128 ** 3, 16) in s


def test_recorded_calls_match_a_real_run() -> None:
    torch.manual_seed(0)
    seen = []

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        seen.append((u.shape[0], u.shape[1], u.shape[2], A.shape[1]))
        return torch.zeros_like(u)

    model = build_model("mhs_vm_2d").eval()
    with scan_override(spy), torch.no_grad():
        model(torch.randn(2, 1, 32, 64))
    assert seen == scan_calls("mhs_vm_2d", (2, 1, 32, 64))[0]


def test_flops() -> None:
    assert scan_flops([(1, 2, 3, 4)], gated=False) == 9 * 24 + 2 * 6
    f = model_flops("lightm_unet_3d")
    assert f["scan"] == scan_flops(model_scan_shapes()["lightm_unet_3d"])
    # in_proj of the first three level-0 Mamba layers alone: 2 * L * 32 * 128 FLOPs each
    assert f["dense"] > 3 * 2 * 40 * 56 * 40 * 32 * 128
    assert model_flops("unet_3d")["scan"] == 0
