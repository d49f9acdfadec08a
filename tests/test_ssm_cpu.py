"""The numba CPU scan and the chunked PyTorch scan against the float64 reference: values and all gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medmamba.ssm._scan_autograd import run_scan
from napari_medmamba.ssm.chunked import ChunkedScanCore, linear_scan, selective_scan_torch
from napari_medmamba.ssm.cpu import NumbaScanCore, selective_scan_cpu
from napari_medmamba.ssm.reference import selective_scan_ref

IMPLEMENTATIONS = {"cpu": selective_scan_cpu, "torch": selective_scan_torch}
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, length, n, groups=None, *, with_d=True, with_z=True, with_bias=True,
                dtype=torch.float64, seed=0):
    """Random scan inputs (float64, then cast), realistic ranges: A < 0, small delta."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    values = {
        "u": torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
        "delta": torch.randn(batch, dim, length, generator=g, dtype=torch.float64) * 0.5 - 1.0,
        "A": -torch.rand(dim, n, generator=g, dtype=torch.float64) * 4 - 0.1,
        "B": torch.randn(*bc_shape, generator=g, dtype=torch.float64),
        "C": torch.randn(*bc_shape, generator=g, dtype=torch.float64),
        "D": torch.randn(dim, generator=g, dtype=torch.float64) if with_d else None,
        "z": torch.randn(batch, dim, length, generator=g, dtype=torch.float64) if with_z else None,
        "delta_bias": torch.randn(dim, generator=g, dtype=torch.float64) * 0.3 if with_bias else None,
    }
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in values.items()}


def run_with_grads(fn, inputs, softplus, last_state, seed=1):
    """Outputs and the gradients of a fixed random functional of (out, last state) w.r.t. every input."""
    result = fn(**inputs, delta_softplus=softplus, return_last_state=last_state)
    out, last = result if last_state else (result, None)
    g = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    if last is not None:
        loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64)).sum()
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return out, last, dict(zip(names, grads))


def rel_max_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def rel_rms_err(a, b):
    b = b.double()
    return ((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


CASES = [  # batch, dim, L, N, groups, D, z, bias, softplus, last_state
    (1, 2, 1, 4, None, True, True, True, True, True),      # L = 1
    (2, 4, 67, 16, None, True, True, True, True, True),    # L not a multiple of the chunk
    (2, 3, 128, 16, None, False, False, False, False, False),  # L a multiple of the chunk, bare
    (1, 4, 150, 1, 2, True, False, True, False, True),     # N = 1, 2 groups
    (2, 6, 90, 4, 3, False, True, False, True, False),     # 3 groups
    (1, 4, 70, 4, 4, True, True, True, True, True),        # one group per channel
]


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}D{}L{}N{}G{}".format(*c[:5]))
def test_float64_matches_reference(impl, case):
    batch, dim, length, n, groups, with_d, with_z, with_bias, softplus, last_state = case
    inputs = make_inputs(batch, dim, length, n, groups, with_d=with_d, with_z=with_z, with_bias=with_bias)
    out, last, grads = run_with_grads(IMPLEMENTATIONS[impl], inputs, softplus, last_state)
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_ref, inputs, softplus, last_state)
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    assert rel_max_err(out, ref_out) < 1e-9
    if last_state:
        assert last.shape == (batch, dim, n)
        assert rel_max_err(last, ref_last) < 1e-9
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].shape == inputs[name].shape, name
        assert rel_max_err(grads[name], ref_grads[name]) < 1e-9, name


@pytest.mark.parametrize("core,shape", [
    (NumbaScanCore(chunk=7), (2, 4, 45, 3, 2)),
    (ChunkedScanCore(block_elements=64, chunk=5), (2, 4, 45, 3, 2)),
    # the numba backward takes channels two at a time: a work item with an odd count (5, or 3 + 2 on two
    # threads) ends with a zero dummy channel; N = 16 runs the specialised kernels with stack buffers
    (NumbaScanCore(chunk=128), (1, 5, 600, 16, None)),
], ids=["numba-chunk7", "torch-tiny-blocks", "numba-odd-channels-N16"])
def test_odd_chunk_and_block_sizes_match_reference(core, shape):
    inputs = make_inputs(*shape, seed=3)

    def fn(**kw):
        return run_scan(core, **kw)

    out, last, grads = run_with_grads(fn, inputs, True, True)
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_ref, inputs, True, True)
    assert rel_max_err(out, ref_out) < 1e-9 and rel_max_err(last, ref_last) < 1e-9
    for name in grads:
        assert rel_max_err(grads[name], ref_grads[name]) < 1e-9, name


def test_long_sequence_cpu_matches_chunked_torch():
    """L = 3000 (47 chunks) with groups: the two independent implementations agree in float64."""
    inputs = make_inputs(2, 4, 3000, 16, 2, seed=5)
    out, last, grads = run_with_grads(selective_scan_cpu, inputs, True, True)
    out2, last2, grads2 = run_with_grads(selective_scan_torch, inputs, True, True)
    assert rel_max_err(out, out2) < 1e-9 and rel_max_err(last, last2) < 1e-9
    for name in grads:
        assert rel_max_err(grads[name], grads2[name]) < 1e-9, name


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "fp16", "bf16"])
def test_low_precision_against_float64_reference(impl, dtype, tol):
    inputs = make_inputs(2, 4, 300, 16, None, dtype=dtype, seed=7)
    inputs["D"] = inputs["D"].detach().float().requires_grad_()  # float32 parameters with low-precision activations
    out, last, grads = run_with_grads(IMPLEMENTATIONS[impl], inputs, True, True)
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_ref, exact, True, True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert rel_rms_err(out, ref_out) < tol
    assert rel_rms_err(last, ref_last) < tol
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert rel_rms_err(grad, ref_grads[name]) < 4 * tol, name


def test_no_grad_forward_equals_grad_forward():
    inputs = make_inputs(1, 3, 100, 4, None, dtype=torch.float32)
    with torch.no_grad():
        plain, last = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)
    tracked, last2 = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(plain, tracked.detach()) and torch.equal(last, last2.detach())


def test_float32_fast_exp_is_accurate_over_the_clamped_range():
    """fp32 scan with one channel, N = 1, u = 1 and B = C = 1 at t=0 only: y_t = exp(sum dt*A) exactly."""
    length = 200
    u = torch.zeros(1, 1, length)
    u[..., 0] = 1.0
    delta = torch.full((1, 1, length), 0.43)
    A = torch.tensor([[-1.7]])
    ones = torch.ones(1, 1, length)
    out = selective_scan_cpu(u, delta, A, ones, ones)
    expected = 0.43 * torch.exp(-1.7 * 0.43 * torch.arange(length, dtype=torch.float64))
    ok = expected > 1e-30
    assert ((out.double()[0, 0] - expected).abs()[ok] / expected[ok]).max() < 2e-5


def test_float32_fast_exp2_is_accurate_and_clamped():
    """The kernels' exp(step * A) is 2^(step * A log2 e): within 4e-7 of exact over the normal range, and a tiny
    non-negative number (never garbage bits) below it."""
    numba = pytest.importorskip("numba")
    from napari_medmamba.ssm._cpu_numba import scan_exp2

    @numba.njit
    def evaluate(xs):
        out = np.empty_like(xs)
        for i in range(xs.size):
            out[i] = scan_exp2(xs[i])
        return out

    xs = np.linspace(-126.0, 127.0, 400_001, dtype=np.float32)
    got = evaluate(xs)
    assert got.dtype == np.float32
    assert np.abs(got / np.exp2(xs.astype(np.float64)) - 1.0).max() < 4e-7
    tiny = evaluate(np.array([-126.5, -200.0, -1e6, -np.inf], dtype=np.float32))
    assert np.all(np.isfinite(tiny)) and np.all(tiny >= 0) and np.all(tiny <= 2.0 ** -125)
    assert evaluate(np.array([0.0], dtype=np.float32))[0] == 1.0


def test_linear_scan_with_initial_state():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 37, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 37, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    h = linear_scan(a, x, h0, chunk=5)
    state = h0
    for t in range(37):
        state = a[..., t, :] * state + x[..., t, :]
        torch.testing.assert_close(h[..., t, :], state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [None, 2])
def test_backward_with_small_items_for_long_rows(monkeypatch: pytest.MonkeyPatch, groups) -> None:
    """Long rows switch the backward to at most BACKWARD_MAX_CHANNELS channels per work item: same gradients
    (summed in another order), and the split really changes (forced here with a tiny row threshold)."""
    from napari_medmamba.ssm import cpu

    inputs = make_inputs(1, 40, 200, 16, groups, dtype=torch.float32)
    ref = run_with_grads(selective_scan_cpu, inputs, True, False)
    core = NumbaScanCore()
    u, bt = inputs["u"].detach(), torch.zeros(1, groups or 1, 200, 16)
    assert core._backward_slices(u, bt) == core._slices_for(u, bt)
    monkeypatch.setattr(cpu, "LARGE_ROW_BYTES", 1)
    monkeypatch.setattr(cpu, "BACKWARD_MAX_CHANNELS", 4)
    assert core._backward_slices(u, bt) == 40 // (groups or 1) // 4
    small = run_with_grads(selective_scan_cpu, inputs, True, False)
    torch.testing.assert_close(small[0], ref[0], rtol=0, atol=0)  # the forward is untouched
    for name in ref[2]:
        torch.testing.assert_close(small[2][name], ref[2][name], rtol=1e-5, atol=1e-5, msg=name)


def test_numba_chunk_larger_than_the_stack_buffers_is_refused():
    from napari_medmamba.ssm import _cpu_numba

    with pytest.raises(ValueError, match="chunk must be between 1 and"):
        NumbaScanCore(chunk=_cpu_numba.MAX_CHUNK + 1)

