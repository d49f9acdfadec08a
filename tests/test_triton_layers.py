"""The Triton layer ops of the Mamba layers: causal depthwise conv1d + SiLU (``ssm.triton.conv1d``), the
channels-first LayerNorm (``ssm.triton.layer_norm``) and the narrow channel mix of dt_proj
(``ssm.triton.channel_mix``); values and all gradients.

CPU: the kernels run through Triton's interpreter in one subprocess (as tests/test_ssm_triton.py), against
PyTorch's ops in float64. CUDA (marked ``cuda``): the Mamba layer's own calls (``models.mamba``) against
PyTorch's ops, fp32 and bf16 autocast, and the switch back to PyTorch's ops.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ssm_triton import HAS_TRITON, rel_rms, run_interpreter_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (batch, channels, L, K, x as a channel slice of a wider tensor, dtype, block of steps per program)
CASES = {
    "slice_b2_K4_blocks": (2, 6, 300, 4, True, "float64", 64),
    "L_shorter_than_K": (1, 3, 3, 4, False, "float64", 64),
    "K2_ragged_channels": (2, 5, 257, 2, True, "float64", 64),
    "bf16": (2, 8, 100, 4, True, "bfloat16", 32),
}


# LayerNorm: (batch, channels, L, x as a channel slice, dtype)
LN_CASES = {
    "ln_C32_slice_b2": (2, 32, 300, True, "float64"),
    "ln_C6_padded": (1, 6, 37, False, "float64"),
    "ln_C256": (1, 256, 50, False, "float64"),
    "ln_bf16": (2, 64, 129, True, "bfloat16"),
}


def _ln_reference(x, w, bias, g, eps):
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, bias))
    out = torch.nn.functional.layer_norm(xr.transpose(1, 2), (xr.shape[1],), wr, br, eps).transpose(1, 2)
    return out, torch.autograd.grad(out, [xr, wr, br], g.double())


def _ln_worker(results: dict) -> None:
    from napari_medmamba.ssm.triton.layer_norm import channels_first_layer_norm_triton

    for i, (name, (b, c, L, view, dtype)) in enumerate(LN_CASES.items()):
        gen = torch.Generator().manual_seed(100 + i)
        dt = getattr(torch, dtype)
        parent = (torch.randn(b, (2 if view else 1) * c, L, generator=gen) * 3 + 1).to(dt).requires_grad_(True)
        x = parent[:, c:] if view else parent
        w = (1 + 0.3 * torch.randn(c, generator=gen)).requires_grad_(True)
        bias = (0.2 * torch.randn(c, generator=gen)).requires_grad_(True)
        out = channels_first_layer_norm_triton(x, w, bias, 1e-5)
        g = torch.randn(out.shape, generator=gen)
        gp, gw, gb = torch.autograd.grad(out, [parent, w, bias], g)
        gx = gp[:, c:] if view else gp
        ref, (rx, rw, rb) = _ln_reference(x, w, bias, g, 1e-5)
        results[name] = {"out": rel_rms(out, ref), "dx": rel_rms(gx, rx), "dw": rel_rms(gw, rw),
                         "dbias": rel_rms(gb, rb), "other_channels_untouched": float((gp[:, :c] == 0).all()) if view
                         else 1.0, "dtype_ok": float(out.dtype == torch.float32 and gx.dtype == dt
                                                     and out.is_contiguous())}


# narrow channel mix (dt_proj): (batch, out channels, in channels, L, x as a channel slice, dtype)
MIX_CASES = {
    "mix_I2_slice_b2": (2, 64, 2, 700, True, "float64"),
    "mix_I3_O6": (1, 6, 3, 100, False, "float64"),
    "mix_I8_bf16": (2, 32, 8, 300, True, "bfloat16"),
}


def _mix_worker(results: dict) -> None:
    import napari_medmamba.ssm.triton.channel_mix as mix

    mix._TOKENS_PER_PROGRAM = 128  # several programs (partial sums) even for short test sequences
    for i, (name, (b, o, n_in, L, view, dtype)) in enumerate(MIX_CASES.items()):
        gen = torch.Generator().manual_seed(200 + i)
        dt = getattr(torch, dtype)
        parent = torch.randn(b, n_in + (5 if view else 0), L, generator=gen).to(dt).requires_grad_(True)
        x = parent[:, :n_in] if view else parent
        w = torch.randn(o, n_in, generator=gen).to(dt).requires_grad_(True)
        out = mix.narrow_channel_mix(w, x)
        g = torch.randn(out.shape, generator=gen).to(out.dtype)
        gp, gw = torch.autograd.grad(out, [parent, w], g)
        gx = gp[:, :n_in] if view else gp
        xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        ref = torch.bmm(wr.expand(b, -1, -1), xr)
        rx, rw = torch.autograd.grad(ref, [xr, wr], g.double())
        results[name] = {"out": rel_rms(out, ref), "dx": rel_rms(gx, rx), "dw": rel_rms(gw, rw),
                         "other_channels_untouched": float((gp[:, n_in:] == 0).all()) if view else 1.0,
                         "dtype_ok": float(out.dtype == dt and gw.dtype == dt and gx.dtype == dt)}


def _reference(x, w, bias, g):
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, bias))
    K = wr.shape[1]
    out = torch.nn.functional.silu(torch.nn.functional.conv1d(xr, wr[:, None, :], br, padding=K - 1,
                                                              groups=xr.shape[1])[..., : xr.shape[-1]])
    return out, torch.autograd.grad(out, [xr, wr, br], g.double())


def _interpreter_worker() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    import napari_medmamba.ssm.triton.conv1d as conv_mod

    results = {}
    for i, (name, (b, c, L, K, view, dtype, block)) in enumerate(CASES.items()):
        conv_mod.BLOCK_L = block  # several blocks along L even for short test sequences
        gen = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        parent = torch.randn(b, 2 * c, L, generator=gen).to(dt).requires_grad_(True)
        x = parent[:, c:] if view else parent
        if not view:
            x = parent[:, :c].detach().clone().requires_grad_(True)
            parent = x
        w = (torch.randn(c, K, generator=gen) * 0.5).requires_grad_(True)
        bias = (torch.randn(c, generator=gen) * 0.1).requires_grad_(True)
        out = conv_mod.causal_conv1d_silu_triton(x, w, bias)
        g = torch.randn(out.shape, generator=gen).to(out.dtype)
        gp, gw, gb = torch.autograd.grad(out, [parent, w, bias], g)
        gx = gp[:, c:] if view else gp
        ref, (rx, rw, rb) = _reference(x, w, bias, g)
        results[name] = {"out": rel_rms(out, ref), "dx": rel_rms(gx, rx), "dw": rel_rms(gw, rw),
                         "dbias": rel_rms(gb, rb), "other_channels_untouched": float((gp[:, :c] == 0).all()) if view
                         else 1.0, "dtype_ok": float(out.dtype == dt and gx.dtype == dt and out.is_contiguous())}
    _ln_worker(results)
    _mix_worker(results)
    print("RESULTS" + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("case", list(CASES) + list(LN_CASES) + list(MIX_CASES))
def test_interpreter_values_and_grads(interpreter_results: dict, case: str) -> None:
    errs = interpreter_results[case]
    dtype = CASES[case][5] if case in CASES else LN_CASES[case][4] if case in LN_CASES else MIX_CASES[case][5]
    tol = 2e-2 if dtype == "bfloat16" else 1e-6  # fp64 inputs are computed in fp32 (the mix's weight gradient)
    assert errs["dtype_ok"] == 1.0 and errs["other_channels_untouched"] == 1.0
    for key in ("out", "dx", "dw", "dbias"):
        if key in errs:
            assert errs[key] <= tol, (key, errs[key])


def test_odd_kernel_size_is_refused_by_the_triton_op() -> None:
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from napari_medmamba.ssm.triton.conv1d import causal_conv1d_silu_triton

    x = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="power-of-two kernel size"):
        causal_conv1d_silu_triton(x, torch.zeros(2, 3), torch.zeros(2))


def test_cpu_layers_never_take_the_triton_op() -> None:
    from napari_medmamba.models.mamba import causal_conv1d_silu

    conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3)
    x = torch.randn(2, 4, 33, requires_grad=True)  # a training call on the CPU: PyTorch's ops
    out = causal_conv1d_silu(conv, x)
    ref = torch.nn.functional.silu(conv(x)[..., :33])
    assert torch.equal(out, ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_cuda_mamba_layer_conv_matches_pytorch(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_medmamba.models.mamba as mamba

    ops, calls = mamba._load_triton_layers(), []
    assert ops is not None
    spy = SimpleNamespace(causal_conv1d_silu_triton=lambda *a: calls.append(1) or ops.causal_conv1d_silu_triton(*a))
    monkeypatch.setattr(mamba, "_load_triton_layers", lambda: spy)
    causal_conv1d_silu = mamba.causal_conv1d_silu
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(64, 64, 4, groups=64, padding=3).cuda()
    parent = torch.randn(2, 128, 262144, device="cuda", requires_grad=True)
    x = parent[:, 64:]
    g = torch.randn(2, 64, 262144, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        xin = x.to(torch.bfloat16) if autocast else x
        out = causal_conv1d_silu(conv, xin)
        ref = torch.nn.functional.silu(conv(xin)[..., :262144])
    assert out.dtype == ref.dtype
    assert calls == [1]  # the Triton op ran, once
    _assert_close_with_grads(out, ref, [parent, conv.weight, conv.bias], g, 2e-2 if autocast else 1e-5)


def _assert_close_with_grads(out, ref, leaves, g, tol) -> None:
    """``out`` and ``ref`` and their gradients with respect to ``leaves`` (for upstream ``g``) agree to ``tol``."""
    assert rel_rms(out, ref) <= tol
    ours = torch.autograd.grad(out, leaves, g.to(out.dtype))
    theirs = torch.autograd.grad(ref, leaves, g.to(ref.dtype))
    for a, b in zip(ours, theirs):
        assert rel_rms(a, b) <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_cuda_mamba_layer_norm_matches_pytorch(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_medmamba.models.mamba as mamba

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    parent = (torch.randn(2, 128, 262144, device="cuda") * 2 + 0.5).requires_grad_(True)
    x = parent[:, 64:].to(torch.bfloat16) if autocast else parent[:, 64:]
    g = torch.randn(2, 64, 262144, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = mamba.channels_first_layer_norm(norm, x)
        monkeypatch.setenv(mamba.TRITON_LAYERS_ENV, "0")
        ref = mamba.channels_first_layer_norm(norm, x)
    assert out.dtype == ref.dtype == torch.float32
    _assert_close_with_grads(out, ref, [parent, norm.weight, norm.bias], g, 2e-2 if autocast else 1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_cuda_dt_proj_mix_matches_pytorch(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_medmamba.models.mamba as mamba

    ops, calls = mamba._load_triton_layers(), []
    spy = SimpleNamespace(narrow_channel_mix=lambda *a: calls.append(1) or ops.narrow_channel_mix(*a))
    monkeypatch.setattr(mamba, "_load_triton_layers", lambda: spy)
    torch.manual_seed(0)
    w = torch.randn(64, 2, device="cuda", requires_grad=True)
    parent = torch.randn(2, 34, 2097152, device="cuda", requires_grad=True)
    x = parent[:, :2]  # dt: a channel slice of x_proj's output
    g = torch.randn(2, 64, 2097152, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = mamba._channel_mix(w, x)
        ref = torch.bmm(w.expand(2, -1, -1), x)
    assert calls == [1] and out.dtype == ref.dtype
    ours = torch.autograd.grad(out, [parent, w], g.to(out.dtype))
    theirs = torch.autograd.grad(ref, [parent, w], g.to(ref.dtype))
    assert rel_rms(out, ref) <= (2e-2 if autocast else 1e-6)
    assert rel_rms(ours[0], theirs[0]) <= (2e-2 if autocast else 1e-6)
    if autocast:
        assert rel_rms(ours[1], theirs[1]) <= 2e-2
    else:  # the weight gradient sums 4M products: judge both against float64, ours as close as cuBLAS's
        dw64 = (g.double() @ x.detach().double().transpose(1, 2)).sum(0)
        assert rel_rms(ours[1], dw64) <= max(rel_rms(theirs[1], dw64), 1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
def test_cuda_environment_switch_gives_pytorchs_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_medmamba.models.mamba import TRITON_LAYERS_ENV, causal_conv1d_silu

    monkeypatch.setenv(TRITON_LAYERS_ENV, "0")
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3).cuda()
    x = torch.randn(2, 8, 1000, device="cuda")
    assert torch.equal(causal_conv1d_silu(conv, x), torch.nn.functional.silu(conv(x)[..., :1000]))


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
