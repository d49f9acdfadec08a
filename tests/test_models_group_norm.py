"""WideGroupNorm / group_norm_wide: the same values and gradients as nn.GroupNorm (models/group_norm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_medmamba.models import group_norm
from napari_medmamba.models.group_norm import WideGroupNorm, group_norm_wide
from napari_medmamba.models.lightm_unet import LightMUNet


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 6, 7), 4), ((1, 32, 9, 8, 10), 8), ((3, 6, 11, 13), 3),
                                          ((2, 4, 17), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_match_group_norm(shape, groups, affine) -> None:
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 5).requires_grad_(True)  # offset: centring matters
    ref_mod = nn.GroupNorm(groups, shape[1], affine=affine).double()
    if affine:
        with torch.no_grad():
            ref_mod.weight.normal_()
            ref_mod.bias.normal_()
    x2 = x.detach().clone().requires_grad_(True)
    w2 = ref_mod.weight.detach().clone().requires_grad_(True) if affine else None
    b2 = ref_mod.bias.detach().clone().requires_grad_(True) if affine else None
    ref = ref_mod(x)
    out = group_norm_wide(x2, groups, w2, b2, ref_mod.eps)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x] + ([ref_mod.weight, ref_mod.bias] if affine else []), g)
    grads = torch.autograd.grad(out, [x2] + ([w2, b2] if affine else []), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bf16_input_is_normalised_in_float32() -> None:
    """As group_norm under autocast: a bf16 map in, float32 out, equal to the float32 computation."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6, 6).bfloat16()
    w, b = torch.randn(8), torch.randn(8)
    out = group_norm_wide(x, 4, w, b, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.group_norm(x.float(), 4, w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_module_is_a_groupnorm_with_the_same_state_dict() -> None:
    """Official LightM-UNet checkpoints (nn.GroupNorm keys) load unchanged; the CPU path is F.group_norm."""
    mod = WideGroupNorm(8, 32)
    assert isinstance(mod, nn.GroupNorm) and set(mod.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 32, 4, 4, 4)
    torch.testing.assert_close(mod(x), nn.GroupNorm(8, 32)(x))
    net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3)
    assert any(isinstance(m, WideGroupNorm) for m in net.modules())


def test_cuda_dispatch_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only maps with at least WIDE_MIN_VALUES values per group take the wide path."""
    calls: list[tuple] = []
    monkeypatch.setattr(group_norm, "group_norm_wide", lambda *a: calls.append(a) or a[0])

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # dispatch decision only; the stub above does the "work"
            return True

    mod = WideGroupNorm(2, 4)
    small = torch.randn(1, 4, 8, 8, 8).as_subclass(FakeCuda)
    big = torch.empty(1, 4, group_norm.WIDE_MIN_VALUES // 2, 1, 1).normal_().as_subclass(FakeCuda)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: __import__("contextlib").nullcontext())
    mod(big)
    assert len(calls) == 1
    monkeypatch.setattr(group_norm.F, "group_norm", lambda *a: a[0])
    mod(small)
    assert len(calls) == 1
