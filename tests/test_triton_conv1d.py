"""The fused causal depthwise conv1d + SiLU in Triton (``ssm.triton.conv1d``): values and all gradients.

CPU: the kernels run through Triton's interpreter in one subprocess (as tests/test_ssm_triton.py), against
PyTorch's conv1d + SiLU in float64. CUDA (marked ``cuda``): the Mamba layer's own call
(``models.mamba.causal_conv1d_silu``) against PyTorch's ops, fp32 and bf16 autocast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
    print("RESULTS" + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_values_and_grads(interpreter_results: dict, case: str) -> None:
    errs = interpreter_results[case]
    tol = 2e-2 if CASES[case][5] == "bfloat16" else 1e-6  # fp64 inputs are computed in fp32
    assert errs["dtype_ok"] == 1.0 and errs["other_channels_untouched"] == 1.0
    for key in ("out", "dx", "dw", "dbias"):
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

    op, calls = mamba._triton_conv1d(), []
    assert op is not None
    monkeypatch.setattr(mamba, "_triton_conv1d", lambda: lambda *a: calls.append(1) or op(*a))
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
    ours = torch.autograd.grad(out, [parent, conv.weight, conv.bias], g.to(out.dtype))
    theirs = torch.autograd.grad(ref, [parent, conv.weight, conv.bias], g.to(ref.dtype))
    tol = 2e-2 if autocast else 1e-5
    assert out.dtype == ref.dtype
    assert calls == [1]  # the Triton op ran, once
    assert rel_rms(out, ref) <= tol
    for a, b in zip(ours, theirs):
        assert rel_rms(a, b) <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
def test_cuda_environment_switch_gives_pytorchs_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_medmamba.models.mamba import TRITON_CONV1D_ENV, causal_conv1d_silu

    monkeypatch.setenv(TRITON_CONV1D_ENV, "0")
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3).cuda()
    x = torch.randn(2, 8, 1000, device="cuda")
    assert torch.equal(causal_conv1d_silu(conv, x), torch.nn.functional.silu(conv(x)[..., :1000]))


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
