"""CPU inference fast paths of the Mamba layers against their PyTorch references, and when each one runs.

The numba kernels (``napari_medmamba.ssm._cpu_numba_layers``: causal conv1d + SiLU, channels-first LayerNorm,
narrow channel mix; ``_cpu_numba_tokens``: the token-major scan, conv1d and LayerNorms of a Mamba layer run
piece by piece), LightM-UNet's pairwise max pooling and the heap-reuse context of ``segment()``. The piece
path's projections run in float32 here (``MEDMAMBA_CPU_BF16=0``) unless a test says otherwise, so that it is
compared with the PyTorch path at float32 tolerances; the bfloat16 products have their own tests.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_medmamba import large_allocations
from napari_medmamba.models import lightm_unet
from napari_medmamba.models.lightm_unet import LightMUNet, MambaLayer, MaxPool
from napari_medmamba.models import mamba as mamba_module
from napari_medmamba.models.mamba import (CPU_BF16_ENV, CPU_LAYERS_ENV, Mamba, causal_conv1d_silu,
                                          channels_first_layer_norm, channels_first_linear, cpu_inference,
                                          piece_product_dtype, scan_override)
from napari_medmamba.ssm import _cpu_numba_layers as kernels
from napari_medmamba.ssm import _cpu_numba_tokens as tokens
from napari_medmamba.ssm.reference import selective_scan_ref


@pytest.fixture(autouse=True)
def _float32_products(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")


def _torch_path(monkeypatch):
    monkeypatch.setenv(CPU_LAYERS_ENV, "0")


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 511, 512, 513, 1500])
@pytest.mark.parametrize("channels,width,batch", [(1, 4, 1), (8, 4, 2), (64, 4, 1), (5, 2, 1), (3, 7, 2)])
def test_conv1d_silu_equals_torch(length, channels, width, batch) -> None:
    g = torch.Generator().manual_seed(length * 31 + channels)
    conv = nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(channels, generator=g))
    xz = torch.randn(batch, 2 * channels, length, generator=g) * 3
    x = xz[:, :channels]  # a channel slice, as Mamba's in_proj output is split: rows contiguous, not the whole
    with torch.inference_mode():
        ref = F.silu(conv(x)[..., :length])
        fast = torch.from_numpy(kernels.conv1d_silu(x.numpy(), conv.weight[:, 0].contiguous().numpy(),
                                                    conv.bias.numpy()))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 7, 512, 513, 3000])
@pytest.mark.parametrize("channels,batch", [(1, 1), (12, 2), (64, 1)])
def test_layer_norm_equals_reference(monkeypatch, length, channels, batch) -> None:
    g = torch.Generator().manual_seed(length + channels)
    norm = nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(batch, channels, length, generator=g) * 3 + 5  # a large mean: two passes stay accurate
    with torch.inference_mode():
        fast = channels_first_layer_norm(norm, x)
        _torch_path(monkeypatch)
        ref = channels_first_layer_norm(norm, x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(fast, norm(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rank,length,batch", [(1, 9, 1), (2, 513, 1), (4, 1000, 2), (8, 3, 1)])
def test_narrow_channel_mix_equals_matrix_product(monkeypatch, rank, length, batch) -> None:
    g = torch.Generator().manual_seed(rank)
    lin = nn.Linear(rank, 24, bias=False)
    x = torch.randn(batch, rank + 5, length, generator=g)[:, 2:2 + rank]  # a slice of x_proj's output
    with torch.inference_mode():
        fast = channels_first_linear(lin, x)
        _torch_path(monkeypatch)
        ref = channels_first_linear(lin, x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_conv1d_silu_dispatch(monkeypatch) -> None:
    """The numba kernel runs for CPU float32 inference only; training and float64 keep PyTorch's conv."""
    calls = []
    real = kernels.conv1d_silu
    monkeypatch.setattr(kernels, "conv1d_silu", lambda *a: calls.append(1) or real(*a))
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(1, 6, 40)
    y_train = causal_conv1d_silu(conv, x)  # weights require grad, grad mode on: autograd needs PyTorch's op
    assert y_train.requires_grad and calls == []
    with torch.no_grad():
        y = causal_conv1d_silu(conv, x)
        assert calls == [1]
        causal_conv1d_silu(conv.double(), x.double())
        assert calls == [1]
    torch.testing.assert_close(y, y_train.detach(), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(CPU_LAYERS_ENV, "0")
    with torch.no_grad():
        causal_conv1d_silu(conv.float(), x)
    assert calls == [1]


def test_cpu_inference_conditions(monkeypatch) -> None:
    w = nn.Parameter(torch.ones(3))
    x = torch.ones(3)
    assert not cpu_inference(x, w)  # grad mode on and a parameter that requires grad: training
    with torch.no_grad():
        assert cpu_inference(x, w)
    with torch.inference_mode():
        assert cpu_inference(x)
        monkeypatch.setenv(CPU_LAYERS_ENV, "0")
        assert not cpu_inference(x)


@pytest.mark.parametrize("dims,shape", [(3, (2, 3, 6, 8, 4)), (2, (1, 5, 10, 6)), (3, (1, 2, 5, 6, 8))])
def test_max_pool_equals_torch(dims, shape) -> None:
    pool = MaxPool(dims, 2)
    x = torch.randn(*shape)
    with torch.inference_mode():
        assert torch.equal(pool(x), pool.pool(x))  # odd sizes (the last case) fall back to PyTorch's pooling
    xg = x.clone().requires_grad_()
    pool(xg).sum().backward()  # training: PyTorch's pooling (one gradient per window)
    assert int(xg.grad.sum()) == pool.pool(x).numel()


def test_max_pool_keeps_nan() -> None:
    x = torch.zeros(1, 1, 2, 2, 2)
    x[0, 0, 1, 0, 1] = float("nan")
    with torch.inference_mode():
        assert torch.isnan(MaxPool(3, 2)(x)).all()


def test_mamba_and_lightm_unet_fast_path_equals_torch_path(monkeypatch) -> None:
    torch.manual_seed(0)
    m = Mamba(d_model=16, d_state=8).eval()
    h = torch.randn(2, 300, 16)
    net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3).eval()
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.inference_mode():
        fast_m, fast_net = m(h), net(x)
        _torch_path(monkeypatch)
        ref_m, ref_net = m(h), net(x)
    torch.testing.assert_close(fast_m, ref_m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_net, ref_net, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 3, 5, 6, 7), (2, 4, 1, 1, 9), (1, 2, 9, 1, 1), (1, 5, 3, 4, 2)])
def test_depthwise_conv3d_kernel_equals_torch(shape) -> None:
    """Zero padding at every border, sizes of one along an axis, batch 2."""
    g = torch.Generator().manual_seed(sum(shape))
    conv = nn.Conv3d(shape[1], shape[1], 3, padding=1, groups=shape[1], bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x = torch.randn(*shape, generator=g)
    with torch.inference_mode():
        got = torch.from_numpy(kernels.depthwise_conv3d_3(x.numpy(), conv.weight[:, 0].contiguous().numpy()))
        torch.testing.assert_close(got, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((1, 32, 6, 5, 7), 8), ((2, 6, 3, 1, 4), 3), ((1, 4, 9, 11), 1),
                                          ((2, 8, 2, 2, 2), 8)])
def test_group_norm_relu_equals_torch_and_runs_in_lightm_unet_inference(monkeypatch, shape, groups) -> None:
    """The fused kernel against F.relu(GroupNorm) (an offset map, 2D and 3D, one channel per group), and
    ``norm_relu``'s routing: CPU float32 inference takes it; training and MEDMAMBA_CPU_LAYERS=0 do not."""
    g = torch.Generator().manual_seed(sum(shape))
    norm = nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(shape[1], generator=g))
        norm.bias.copy_(0.3 * torch.randn(shape[1], generator=g))
    x = torch.randn(*shape, generator=g) * 4 + 2
    calls = []
    real = kernels.group_norm_relu
    monkeypatch.setattr(kernels, "group_norm_relu", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        ref = F.relu(norm(x))
        torch.testing.assert_close(lightm_unet.norm_relu(norm, x), ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]
    x.requires_grad_(True)
    lightm_unet.norm_relu(norm, x).sum().backward()  # training: the module and F.relu, with gradients
    assert calls == [1] and x.grad is not None
    _torch_path(monkeypatch)
    with torch.inference_mode():
        lightm_unet.norm_relu(norm, x.detach())
    assert calls == [1]


@pytest.mark.parametrize("shape", [(1, 3, 5, 6, 7), (2, 2, 1, 1, 1), (1, 1, 1, 4, 1), (2, 4, 3, 1, 5)])
def test_upsample2_add_equals_torch_and_runs_in_lightm_unet_inference(monkeypatch, shape) -> None:
    """The fused decoder step against F.interpolate(trilinear, x2, align_corners=False) + skip (sizes of one,
    odd sizes, batch 2), and ``upsample_add``'s routing: CPU float32 inference of 3D maps takes it; training,
    2D maps and MEDMAMBA_CPU_LAYERS=0 do not."""
    g = torch.Generator().manual_seed(sum(shape))
    up = nn.Sequential(lightm_unet.ConvOnly(3, 2 * shape[1], shape[1], 1), lightm_unet.Upsample(3))
    x = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g)
    skip = torch.randn(*shape[:2], *(2 * s for s in shape[2:]), generator=g)
    calls = []
    real = kernels.upsample2_add
    monkeypatch.setattr(kernels, "upsample2_add", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        ref = F.interpolate(up[0](x), scale_factor=2, mode="trilinear", align_corners=False) + skip
        torch.testing.assert_close(lightm_unet.upsample_add(up, x, skip), ref, rtol=1e-6, atol=1e-6)
        assert calls == [1]
        up2d = nn.Sequential(lightm_unet.ConvOnly(2, 4, 2, 1), lightm_unet.Upsample(2))
        assert lightm_unet.upsample_add(up2d, torch.randn(1, 4, 3, 5), torch.randn(1, 2, 6, 10)).shape == (1, 2, 6, 10)
    assert calls == [1]
    x.requires_grad_(True)
    lightm_unet.upsample_add(up, x, skip).sum().backward()  # training: the modules, with gradients
    assert calls == [1] and x.grad is not None
    _torch_path(monkeypatch)
    with torch.inference_mode():
        lightm_unet.upsample_add(up, x.detach(), skip)
    assert calls == [1]


@pytest.mark.parametrize("in_ch,out_ch,k,groups,bias,dims", [(6, 6, 1, 6, True, 3), (1, 5, 1, 1, False, 3),
                                                            (4, 4, 1, 4, False, 2), (3, 3, 3, 3, False, 3),
                                                            (4, 6, 1, 1, True, 3)])
def test_conv_only_fast_paths_equal_torch(monkeypatch, in_ch, out_ch, k, groups, bias, dims) -> None:
    """ConvOnly in CPU inference: per-channel 1x1 convolutions as a multiply-add, large depthwise 3x3x3 ones with
    numba (threshold lowered so a small map takes it); the rest, training and MEDMAMBA_CPU_LAYERS=0 use the conv."""
    monkeypatch.setattr(lightm_unet, "DEPTHWISE_NUMBA_MIN_VOXELS", 16)
    torch.manual_seed(in_ch + out_ch + k)
    m = lightm_unet.ConvOnly(dims, in_ch, out_ch, k, groups=groups, bias=bias)
    x = torch.randn((2, in_ch) + (5, 4, 6)[:dims])
    calls = []
    real_conv, real_dw = m.conv.forward, kernels.depthwise_conv3d_3
    monkeypatch.setattr(m.conv, "forward", lambda t: calls.append("conv") or real_conv(t))
    monkeypatch.setattr(kernels, "depthwise_conv3d_3", lambda *a: calls.append("numba") or real_dw(*a))
    with torch.inference_mode():
        fast = m(x)
        expected = {(6, 6): [], (1, 5): [], (4, 4): [], (3, 3): ["numba"], (4, 6): ["conv"]}[(in_ch, out_ch)]
        assert calls == expected
        ref = real_conv(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    calls.clear()
    m(x).sum().backward()  # training: the convolution itself
    assert calls == ["conv"]


def _reference_scan(u, dt_low, w_dt, A, Bt, Ct, D, z, bias):
    """selective_scan_ref in float64 on token-major inputs (delta = dt_low @ w_dt): (out (B, T, C), state (B, N, C))."""
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).double()  # noqa: E731
    delta = f(dt_low) @ f(w_dt)
    out, last = selective_scan_ref(f(u).transpose(1, 2), delta.transpose(1, 2), f(A), f(Bt).transpose(1, 2),
                                   f(Ct).transpose(1, 2), f(D), f(z).transpose(1, 2), f(bias), delta_softplus=True,
                                   return_last_state=True)
    return out.transpose(1, 2).numpy(), last.transpose(1, 2).numpy()


@pytest.mark.parametrize("batch,length,channels,n_state,rank",
                         [(1, 300, 64, 16, 2), (2, 77, 40, 16, 3), (1, 50, 8, 4, 1), (1, 129, 24, 16, 8),
                          (2, 5, 16, 7, 2)])
def test_token_major_scan_equals_reference_and_continues_across_pieces(batch, length, channels, n_state, rank) -> None:
    """Channel counts that are not a multiple of the 16 lanes, the generic state size (N != 16), B and C read as
    column slices of x_proj's output, and a sequence cut into pieces that carry the state."""
    rng = np.random.default_rng(length + channels)
    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    u, z = f32(batch, length, channels), f32(batch, length, channels)
    x_dbl = f32(batch, length, rank + 2 * n_state)
    dt_low, Bt, Ct = x_dbl[..., :rank], x_dbl[..., rank:rank + n_state], x_dbl[..., rank + n_state:]
    w_dt = f32(rank, channels) * np.float32(0.5)
    A = -np.exp(f32(channels, n_state))
    D, bias = f32(channels), f32(channels) - np.float32(2.0)
    a2 = np.ascontiguousarray((A * np.float32(np.log2(np.e))).T)
    state = np.zeros((batch, n_state, channels), np.float32)
    out = tokens.scan_tokens(u, dt_low, w_dt, a2, Bt, Ct, D, z, bias, state)
    ref, ref_state = _reference_scan(u, dt_low, w_dt, A, Bt, Ct, D, z, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(state, ref_state, rtol=1e-4, atol=2e-4)
    carried = np.zeros_like(state)
    pieces = [tokens.scan_tokens(*(np.ascontiguousarray(a[:, t0:t0 + 32]) for a in (u, dt_low)), w_dt, a2,
                                 *(np.ascontiguousarray(a[:, t0:t0 + 32]) for a in (Bt, Ct)), D,
                                 np.ascontiguousarray(z[:, t0:t0 + 32]), bias, carried) for t0 in range(0, length, 32)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carried, state, rtol=1e-5, atol=1e-5)


def test_token_major_scan_refuses_too_many_states() -> None:
    x = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="at most"):
        tokens.scan_tokens(x, x[..., :1], np.zeros((1, 4), np.float32), np.zeros((tokens.MAX_STATE + 1, 4), np.float32),
                           np.zeros((1, 2, 65), np.float32), np.zeros((1, 2, 65), np.float32), np.zeros(4, np.float32),
                           x, np.zeros(4, np.float32), np.zeros((1, 65, 4), np.float32))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_token_major_conv1d_silu_continues_across_pieces(width) -> None:
    g = torch.Generator().manual_seed(width)
    conv = nn.Conv1d(20, 20, width, groups=20, padding=width - 1)
    x = torch.randn(2, 20, 103, generator=g)
    with torch.inference_mode():
        ref = F.silu(conv(x)[..., :103]).transpose(1, 2)
        xt = x.transpose(1, 2).contiguous().numpy()
        w, b = conv.weight[:, 0].contiguous().numpy(), conv.bias.numpy()
        history = np.zeros((2, width - 1, 20), np.float32)
        pieces = []
        for t0 in range(0, 103, 40):  # the carried history is the previous piece's last K - 1 inputs
            out, same = tokens.conv1d_silu_tokens(np.ascontiguousarray(xt[:, t0:t0 + 40]), w, b, history)
            assert np.shares_memory(out, same)  # without ``like`` the second output is the first
            pieces.append(out)
            history = np.ascontiguousarray(xt[:, max(0, t0 + 40 - (width - 1)):t0 + 40]) if width > 1 else history
    torch.testing.assert_close(torch.from_numpy(np.concatenate(pieces, axis=1)), ref, rtol=1e-5, atol=1e-5)


def test_token_major_layer_norms_equal_torch() -> None:
    g = torch.Generator().manual_seed(3)
    norm = nn.LayerNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(2, 24, 500, generator=g) * 3 + 5
    y = torch.randn(2, 100, 24, generator=g)
    args = (norm.weight.detach().numpy(), norm.bias.detach().numpy(), norm.eps)
    with torch.inference_mode():
        piece, normed = tokens.layer_norm_to_tokens(x.numpy(), 130, 100, *args)
        ref_piece = x[:, :, 130:230].transpose(1, 2)
        assert torch.equal(torch.from_numpy(piece), ref_piece)
        torch.testing.assert_close(torch.from_numpy(normed), norm(ref_piece), rtol=1e-5, atol=2e-5)
        skipped = tokens.skip_layer_norm(y.numpy(), piece, 0.7, *args)
        torch.testing.assert_close(torch.from_numpy(skipped), norm(y + 0.7 * ref_piece), rtol=1e-5, atol=2e-5)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 by torch, as the uint16 bits the token kernels read."""
    return torch.from_numpy(a).bfloat16().view(torch.uint16).numpy()


def test_token_major_kernels_read_and_write_bf16_bits_exactly_as_torch_casts() -> None:
    """With ``like`` a uint16 array, each kernel reads bf16 bits where products' outputs come in and writes
    bf16 bits where products' inputs go out; the result is bit-equal to the float32 kernel on the widened inputs
    followed by torch's bf16 cast (round to nearest even), and the float32 outputs are unchanged."""
    like = np.empty(0, np.uint16)
    rng = np.random.default_rng(7)
    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    widen = lambda bits: torch.from_numpy(bits).view(torch.bfloat16).float().numpy()  # noqa: E731
    as_bf16 = lambda a: torch.from_numpy(a).bfloat16()  # noqa: E731
    as_bits = lambda bits: torch.from_numpy(bits).view(torch.bfloat16)  # noqa: E731
    # conv1d + SiLU: bf16 input (in_proj's output), float32 output for the scan and bf16 bits for x_proj
    x, w, b, hist = f32(2, 70, 24), f32(24, 4), f32(24), f32(2, 3, 24)
    out, prod = tokens.conv1d_silu_tokens(_bf16_bits(x), w, b, hist, like)
    ref, _ = tokens.conv1d_silu_tokens(widen(_bf16_bits(x)), w, b, hist)
    assert prod.dtype == np.uint16 and np.array_equal(out, ref) and torch.equal(as_bits(prod), as_bf16(ref))
    # the scan: z in bf16 bits (in_proj's output), y out as bf16 bits (out_proj's input)
    u, z, x_dbl = f32(1, 50, 32), f32(1, 50, 32), f32(1, 50, 2 + 32)
    a2 = -np.exp(f32(16, 32))
    D, bias, w_dt = f32(32), f32(32), f32(2, 32)
    args = (x_dbl[..., :2], w_dt, a2, x_dbl[..., 2:18], x_dbl[..., 18:], D)
    s1, s2 = np.zeros((1, 16, 32), np.float32), np.zeros((1, 16, 32), np.float32)
    y = tokens.scan_tokens(u, *args, _bf16_bits(z), bias, s1, like)
    y_ref = tokens.scan_tokens(u, *args, widen(_bf16_bits(z)), bias, s2)
    assert y.dtype == np.uint16 and torch.equal(as_bits(y), as_bf16(y_ref)) and np.array_equal(s1, s2)
    # the norms: bf16 bits out (in_proj's and proj's inputs), bf16 bits in (out_proj's output)
    xc, lw, lb = f32(1, 24, 300) * 3 + 1, f32(24), f32(24)
    piece, normed = tokens.layer_norm_to_tokens(xc, 17, 90, lw, lb, 1e-5, like)
    piece_ref, normed_ref = tokens.layer_norm_to_tokens(xc, 17, 90, lw, lb, 1e-5)
    assert np.array_equal(piece, piece_ref) and torch.equal(as_bits(normed), as_bf16(normed_ref))
    yy = f32(1, 90, 24)
    skipped = tokens.skip_layer_norm(_bf16_bits(yy), piece, 0.7, lw, lb, 1e-5, like)
    skipped_ref = tokens.skip_layer_norm(widen(_bf16_bits(yy)), piece, 0.7, lw, lb, 1e-5)
    assert torch.equal(as_bits(skipped), as_bf16(skipped_ref))
    # the output projection back into the channels-first map, bf16 widened
    out_cf = np.full((1, 24, 200), np.nan, np.float32)
    tokens.tokens_to_channels(skipped, out_cf, 100)
    tokens.tokens_to_channels(skipped_ref, out_cf, 10)
    assert np.array_equal(out_cf[..., 100:190], as_bits(skipped).float().transpose(1, 2).numpy())
    assert np.array_equal(out_cf[..., 10:100], skipped_ref.transpose(0, 2, 1))
    assert np.isnan(out_cf[..., :10]).all() and np.isnan(out_cf[..., 190:]).all()
    # rounding: ties go to even, as torch's cast does; large values and signed zero
    values = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -9, 3.0e38, -0.0, 1e-30], np.float32)
    assert np.array_equal(_kernel_bf16_bits(values), _bf16_bits(values))
    # the plain-Python versions of the helpers (numba's pure-Python mode) agree with the compiled ones
    bits16 = np.empty(0, np.uint16)
    assert np.array_equal(np.array([tokens.as_element(v, bits16) for v in values], np.uint16), _bf16_bits(values))
    widened = [tokens.as_float32(b) for b in _bf16_bits(values)]
    assert np.array_equal(np.array(widened, np.float32), widen(_bf16_bits(values)))


@numba.njit
def _kernel_bf16_bits(values):
    """The kernels' float32 -> bf16 rounding (``as_element`` into a uint16 array) of a 1-d float32 array."""
    out = np.empty(values.shape, np.uint16)
    for i in range(values.size):
        out[i] = tokens.as_element(values[i], out)
    return out


def _trained_looking_layer(monkeypatch, channels: int, length: int, batch: int, piece: int):
    """A MambaLayer with A, D and the skip scale away from their initial values, an input, and pieces of ``piece``
    tokens."""
    torch.manual_seed(channels + length)
    layer = MambaLayer(channels, channels + 8).eval()
    with torch.no_grad():
        layer.mamba.A_log.add_(torch.randn_like(layer.mamba.A_log) * 0.3)
        layer.mamba.D.add_(torch.randn_like(layer.mamba.D))
        layer.skip_scale.fill_(0.6)
    x = torch.randn(batch, channels, length)
    monkeypatch.setattr(lightm_unet, "PIECE_TOKENS", piece)
    return layer, x


@pytest.mark.parametrize("channels,length,batch,piece", [(32, 1000, 1, 256), (16, 777, 2, 100), (24, 50, 1, 4096),
                                                         (8, 301, 1, 3)])
def test_mamba_layer_in_pieces_equals_torch_path(monkeypatch, channels, length, batch, piece) -> None:
    """The token-major piece-by-piece path (CPU inference) against the channels-first PyTorch path, with trained-
    looking parameters (A, D, skip scale away from their initial values), pieces shorter than the conv1d's width."""
    layer, x = _trained_looking_layer(monkeypatch, channels, length, batch, piece)
    calls = []
    real = layer._forward_pieces
    monkeypatch.setattr(layer, "_forward_pieces", lambda flat: calls.append(1) or real(flat))
    with torch.inference_mode():
        fast = layer(x)
        assert calls == [1]
        _torch_path(monkeypatch)
        ref = layer(x)
        assert calls == [1]
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-5)


def test_piece_products_are_bf16_only_where_the_cpu_multiplies_it(monkeypatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV)
    monkeypatch.setattr(mamba_module, "cpu_multiplies_bf16", lambda: False)
    assert piece_product_dtype() == torch.float32
    monkeypatch.setattr(mamba_module, "cpu_multiplies_bf16", lambda: True)
    assert piece_product_dtype() == torch.bfloat16
    with mamba_module.float32_products():  # segment(precision="fp32"): this thread only
        assert piece_product_dtype() == torch.float32
        other = []
        worker = threading.Thread(target=lambda: other.append(piece_product_dtype()))
        worker.start()
        worker.join()
        assert other == [torch.bfloat16]
    assert piece_product_dtype() == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert piece_product_dtype() == torch.float32


@pytest.mark.parametrize("channels,length,batch,piece", [(32, 1000, 1, 256), (16, 777, 2, 100)])
def test_mamba_layer_in_pieces_with_bf16_products(monkeypatch, channels, length, batch, piece) -> None:
    """bfloat16 projections in the piece path (CPUs with native bf16 products): every projection sees bf16
    inputs and weights, nothing else does, and the output stays float32 and within bf16 rounding of the float32
    PyTorch path (relative RMS < 1e-2; the models were trained with bf16 products under autocast)."""
    monkeypatch.delenv(CPU_BF16_ENV)
    monkeypatch.setattr(mamba_module, "cpu_multiplies_bf16", lambda: True)
    layer, x = _trained_looking_layer(monkeypatch, channels, length, batch, piece)
    seen = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w, b=None: seen.append((a.dtype, w.dtype)) or real_linear(a, w, b))
    with torch.inference_mode():
        fast = layer(x)
        assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
        assert len(seen) == 5 * -(-length // piece)  # in_proj (u, z), x_proj, out_proj, proj per piece
        _torch_path(monkeypatch)
        ref = layer(x)
    assert fast.dtype == torch.float32
    rel = float((fast - ref).square().mean().sqrt() / ref.square().mean().sqrt())
    assert 0 < rel < 1e-2


def test_mamba_layer_pieces_only_in_cpu_float32_inference(monkeypatch) -> None:
    """Training, float64, CPU autocast, a forced scan backend and a scan override (scan_shapes) see whole
    sequences."""
    layer = MambaLayer(8, 8)
    x = torch.randn(1, 8, 40)
    calls = []
    real = layer._forward_pieces
    monkeypatch.setattr(layer, "_forward_pieces", lambda flat: calls.append(1) or real(flat))
    layer(x).sum().backward()  # training
    with torch.inference_mode():
        layer.double()(x.double())
        layer.float()
        with scan_override(lambda *a, **k: selective_scan_ref(*a, **k)):
            layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # segment(precision="bf16") on a CPU
            assert layer(x).shape == (1, 8, 40)
        monkeypatch.setenv("MEDMAMBA_SSM_BACKEND", "torch")
        layer(x)
        assert calls == []
        monkeypatch.delenv("MEDMAMBA_SSM_BACKEND")
        layer(x)
    assert calls == [1]


def test_warm_cpu_kernels_compiles_what_inference_uses(monkeypatch) -> None:
    """After the warm-up a LightM-UNet forward on the CPU compiles nothing more (numba's dispatchers gain no
    signature), and with the fast paths off it does nothing."""
    def signatures() -> dict[str, int]:
        found = {name: len(getattr(tokens, name).signatures)
                 for name in ("conv1d_silu_tokens", "layer_norm_to_tokens", "skip_layer_norm")}
        return found | {"scan": len(tokens._SCAN[16].signatures), "depthwise": len(kernels.depthwise_conv3d_3.signatures),
                        "upsample": len(kernels.upsample2_add.signatures)}

    assert lightm_unet.warm_cpu_kernels()
    compiled = signatures()
    assert all(n >= 1 for n in compiled.values()), compiled
    monkeypatch.setattr(lightm_unet, "DEPTHWISE_NUMBA_MIN_VOXELS", 16)  # the real model's large maps
    net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3).eval()
    with torch.inference_mode():
        net(torch.randn(1, 1, 24, 16, 8))
    assert signatures() == compiled
    _torch_path(monkeypatch)
    assert not lightm_unet.warm_cpu_kernels()


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_reuse_large_allocations_sets_and_restores_once(monkeypatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(large_allocations, "_glibc", lambda: fake)
    with large_allocations.reuse_large_allocations():
        assert large_allocations.is_active()
        with large_allocations.reuse_large_allocations():  # nested: no second change, no early restore
            pass
        assert large_allocations.is_active()
        assert fake.calls == [("mallopt", -3, 1 << 30), ("mallopt", -1, 1 << 30)]
    assert not large_allocations.is_active()
    assert fake.calls[2:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("malloc_trim", 0)]


def test_reuse_large_allocations_restores_after_an_error_and_obeys_the_env_var(monkeypatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(large_allocations, "_glibc", lambda: fake)
    with pytest.raises(RuntimeError), large_allocations.reuse_large_allocations():
        raise RuntimeError("cancelled")
    assert fake.calls[-1] == ("malloc_trim", 0) and not large_allocations.is_active()
    fake.calls.clear()
    monkeypatch.setenv(large_allocations.ENV_VAR, "0")
    with large_allocations.reuse_large_allocations():
        assert not large_allocations.is_active()
    assert fake.calls == []


def test_reuse_large_allocations_on_this_machine() -> None:
    """With the real C library (glibc in CI) the block runs and the numbers a forward pass gives are unchanged."""
    torch.manual_seed(0)
    net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        ref = net(x)
        with large_allocations.reuse_large_allocations():
            big = torch.ones(64 << 20 >> 2)  # 64 MiB: above glibc's usual mmap threshold
            out = net(x)
            assert float(big.sum()) == big.numel()
    assert torch.equal(out, ref)


def test_segment_runs_the_network_with_heap_reuse_on_the_cpu() -> None:
    import numpy as np

    from napari_medmamba.inference import segment
    from test_inference_support import ThresholdNet, contract

    seen = []

    class Spy(ThresholdNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(large_allocations.is_active())
            return super().forward(x)

    volume = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    segment(volume, (Spy(), contract(orientation=None)), device="cpu")
    assert seen and all(seen)
    assert not large_allocations.is_active()


@pytest.mark.parametrize("device,expected", [("cpu", True), ("auto", not torch.cuda.is_available()), ("meta", False)])
def test_training_entry_points_reuse_large_allocations_on_the_cpu(device, expected) -> None:

    seen = []

    @large_allocations.reusing_large_allocations_on_cpu
    def step(*, device: str = "auto") -> None:
        seen.append(large_allocations.is_active())

    step(device=device)
    assert seen == [expected] and not large_allocations.is_active()


def test_finetune_and_train_run_with_heap_reuse_on_the_cpu(monkeypatch) -> None:
    import napari_medmamba.training.finetune as ft
    import napari_medmamba.training.trainer as tr

    class Seen(Exception):
        pass

    def record(*args, **kwargs):
        raise Seen(large_allocations.is_active())

    monkeypatch.setattr(ft, "_base", record)  # the first step of finetune()
    monkeypatch.setattr(tr.CachedCases, "load", record)  # the first data step of train()
    for call in (lambda: ft.finetune("lightm_unet_3d", [object()], device="cpu"),
                 lambda: tr.train("unet_3d", "cache.npz", "out", budget_s=1, device="cpu")):
        with pytest.raises(Seen) as info:
            call()
        assert info.value.args == (True,)
    assert not large_allocations.is_active()


@pytest.mark.parametrize("precision,expected", [("auto", torch.bfloat16), ("fp32", torch.float32)])
def test_segment_precision_chooses_the_cpu_products(monkeypatch, precision, expected) -> None:
    """On a CPU with native bf16 products, segment(precision="auto") runs the Mamba layers' projections as bf16
    products and precision="fp32" keeps them float32."""
    import numpy as np

    from napari_medmamba.inference import segment
    from test_inference_support import contract

    monkeypatch.delenv(CPU_BF16_ENV)
    monkeypatch.setattr(mamba_module, "cpu_multiplies_bf16", lambda: True)
    torch.manual_seed(0)
    net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2).eval()
    seen = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w, b=None: seen.append(w.dtype) or real_linear(a, w, b))
    volume = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    result = segment(volume, (net, contract(orientation=None)), device="cpu", precision=precision)
    assert result.labels.array.shape == (16, 16, 16)
    assert seen and set(seen) == {expected}
    assert piece_product_dtype() == torch.bfloat16  # the setting applied to that call only
