"""Triton selective scan: values and all gradients against float64 references.

CPU: the kernels run through Triton's interpreter in ONE subprocess (TRITON_INTERPRET must be
set before triton is imported, which must not leak into this pytest process); each case's
relative RMS errors come back as JSON. CUDA (marked ``cuda``): full shapes, all dtypes, against
a float64 log-depth scan on the GPU with hand-derived gradients.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 3e-3}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# Interpreter cases: tiny tiles (T=16) so that short sequences cross tiles and chunks.
CASES = {
    "L1_all_options": dict(shape=(1, 4, 1, 4)),
    "chunks_N4": dict(shape=(2, 4, 40, 4), cfg=dict(T=16, chunk_tiles=1)),
    "ragged_G2_N16_split": dict(shape=(1, 4, 72, 16), groups=2,
                                cfg=dict(T=16, chunk_tiles=2, block_d=2, bwd_block_d=1, bwd_split=1)),
    "plain_no_z_D_bias_softplus": dict(shape=(2, 4, 70, 4), z=False, D=False, bias=False,
                                       softplus=False, cfg=dict(T=16, chunk_tiles=2)),
    "G4_dpg2_N3": dict(shape=(1, 8, 45, 3), groups=4,
                       cfg=dict(T=16, chunk_tiles=1, bwd_block_d=1, bwd_split=2)),
    "auto_config_N16": dict(shape=(1, 2, 90, 16)),
    # the forward's state-column loop unrolled (the bf16/fp16 default), N not a power of two (masked columns)
    "unrolled_N3_G2": dict(shape=(1, 4, 50, 3), groups=2, cfg=dict(T=16, chunk_tiles=2, unroll_n=True)),
    # B in 2 groups, C shared by every channel: dC sums the groups' partial rows
    "B_grouped_C_plain": dict(shape=(2, 4, 40, 4), groups=2, c_plain=True, cfg=dict(T=16, chunk_tiles=1)),
    "bf16_chunks": dict(shape=(2, 4, 50, 4), dtype="bfloat16", cfg=dict(T=16, chunk_tiles=1)),
    "fp16_ragged": dict(shape=(1, 4, 37, 4), dtype="float16", z=False,
                        cfg=dict(T=16, chunk_tiles=2)),
    # u, delta, z, B, C as channel slices of wider tensors (batch stride != dim * L), batch 2: the layout of
    # the channels-first Mamba layer; the gradients must not be written with the inputs' strides
    "strided_views_b2": dict(shape=(2, 4, 40, 4), views=True, cfg=dict(T=16, chunk_tiles=1)),
    "strided_views_b2_short": dict(shape=(2, 4, 40, 4), views=True, cfg=dict(path="short")),
}


def channel_slice_leaf(x: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """``x``'s values as channels extra.. of a wider leaf tensor (batch stride (C + extra) * L)."""
    parent = torch.zeros(x.shape[0], x.shape[1] + extra, *x.shape[2:], dtype=x.dtype)
    with torch.no_grad():
        parent[:, extra:] = x
    return parent.requires_grad_(True)[:, extra:]


def make_inputs(shape, groups=None, z=True, D=True, bias=True, softplus=True,
                dtype="float32", device="cpu", seed=0):
    """Random inputs in ``dtype`` (A, D, delta_bias fp32) for one case."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bs, dim, length, n = shape
    dt = getattr(torch, dtype)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(dt).to(device)

    bc = (bs, n, length) if groups is None else (bs, groups, n, length)
    delta = rnd(bs, dim, length, scale=0.5)
    if not softplus:
        delta = delta.abs()
    return dict(
        u=rnd(bs, dim, length), delta=delta,
        A=(-(torch.rand(dim, n, generator=gen) * 4 + 0.5)).to(device),
        B=rnd(*bc), C=rnd(*bc),
        D=torch.randn(dim, generator=gen).to(device) if D else None,
        z=rnd(bs, dim, length) if z else None,
        delta_bias=(torch.randn(dim, generator=gen) * 0.3).to(device) if bias else None,
    )


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return float("nan") if not torch.isfinite(a).all() else err


def _interpreter_worker() -> None:
    """Run every CASE through the Triton interpreter; print {case: {name: rel_rms}}."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from napari_medmamba.ssm.reference import selective_scan_ref
    from napari_medmamba.ssm.triton import is_available, selective_scan_triton

    assert is_available()
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        ins = make_inputs(case["shape"], case.get("groups"), case.get("z", True),
                          case.get("D", True), case.get("bias", True), case.get("softplus", True),
                          case.get("dtype", "float32"), seed=i)
        if case.get("c_plain"):
            ins["C"] = ins["C"][:, 0].contiguous()
        sp = case.get("softplus", True)
        views = ("u", "delta", "z", "B", "C") if case.get("views") else ()
        leaves = {k: channel_slice_leaf(v) if k in views else v.clone().requires_grad_(True)
                  for k, v in ins.items() if v is not None}
        args = {k: leaves.get(k) for k in ins}
        out, last = selective_scan_triton(**args, delta_softplus=sp, return_last_state=True,
                                          config=case.get("cfg"))
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(99 + i)).to(out.dtype)
        grads = torch.autograd.grad(out, list(leaves.values()), dout)
        ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
        ref_out, ref_last = selective_scan_ref(**{k: ref_leaves.get(k) for k in ins},
                                               delta_softplus=sp, return_last_state=True)
        ref_grads = torch.autograd.grad(ref_out, list(ref_leaves.values()), dout.double())
        errs = {"out": rel_rms(out, ref_out), "last_state": rel_rms(last, ref_last),
                "out_dtype_ok": float(out.dtype == ins["u"].dtype)}
        errs.update({f"d{k}": rel_rms(g, r) for k, g, r in zip(leaves, grads, ref_grads)})
        errs.update({f"d{k}_dtype_ok": float(g.dtype == leaves[k].dtype)
                     for k, g in zip(leaves, grads)})
        results[name] = errs
    print("RESULTS" + json.dumps(results))


def run_interpreter_worker(test_file: str) -> dict:
    """Run ``test_file --interpreter-worker`` under TRITON_INTERPRET=1; the JSON it prints after 'RESULTS'."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, "--interpreter-worker"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS"):])


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_values_and_grads(interpreter_results: dict, case: str) -> None:
    errs = interpreter_results[case]
    tol = TOL[CASES[case].get("dtype", "float32")]
    expected = {"out", "last_state", "du", "ddelta", "dA", "dB", "dC"}
    assert expected <= set(errs)
    for key, value in errs.items():
        if key.endswith("_dtype_ok"):
            assert value == 1.0, key
        else:
            assert value == value and value <= tol, (key, value, tol)


def test_unavailable_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_medmamba.ssm.triton as st

    monkeypatch.setattr(st, "_triton_installed", lambda: False)
    assert st.is_available() is False
    x = torch.zeros(1, 1, 1)
    with pytest.raises(ImportError, match="pip install triton"):
        st.selective_scan_triton(x, x, torch.zeros(1, 1), x, x)


def test_launch_config_depends_on_the_input_precision() -> None:
    from napari_medmamba.ssm.triton.launch import choose_config

    cpu = torch.device("cpu")
    fp32 = choose_config(2, 64, 32768, 16, 1, cpu)
    half = choose_config(2, 64, 32768, 16, 1, cpu, half=True)
    assert (fp32.unroll_n, fp32.num_warps) == (False, 2)
    assert (half.unroll_n, half.num_warps) == (True, 1)
    assert fp32.bwd_num_warps == half.bwd_num_warps == 1
    # explicit overrides win, False included
    forced = choose_config(2, 64, 32768, 16, 1, cpu, half=True, unroll_n=False, num_warps=4)
    assert (forced.unroll_n, forced.num_warps) == (False, 4)
    # a misspelt launch parameter is an error, not silently the default
    with pytest.raises(ValueError, match="unknown launch parameters of the Triton scan: bwd_warps"):
        choose_config(2, 64, 32768, 16, 1, cpu, bwd_warps=2)


# ---------------------------------------------------------------- CUDA, full shapes


def _scan64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along the last axis (h_{-1} = 0), Hillis-Steele, in place."""
    a, b = a.clone(), b.clone()
    s = 1
    while s < a.shape[-1]:
        b[..., s:] += a[..., s:] * b[..., :-s]
        a[..., s:] *= a[..., :-s].clone()
        s *= 2
    return b


def ref64_with_grads(ins: dict, dout: torch.Tensor, softplus: bool):
    """Float64 output, last state and all gradients, derived by hand (no autograd graph)."""
    f = {k: (v.double() if v is not None else None) for k, v in ins.items()}
    u, raw, A = f["u"], f["delta"], f["A"]
    bs, dim, length = u.shape
    if f["delta_bias"] is not None:
        raw = raw + f["delta_bias"][None, :, None]
    dl = torch.nn.functional.softplus(raw) if softplus else raw
    from napari_medmamba.ssm.reference import expand_groups

    Bx, Cx = expand_groups(f["B"], dim), expand_groups(f["C"], dim)
    a = torch.exp(dl[:, :, None, :] * A[None, :, :, None])
    bb = (dl * u)[:, :, None, :] * Bx
    h = _scan64(a, bb)
    y = (h * Cx).sum(2)
    if f["D"] is not None:
        y = y + f["D"][None, :, None] * u
    go = dout.double()
    out, dy, dz = y, go, None
    if f["z"] is not None:
        zz = f["z"]
        sz = torch.sigmoid(zz)
        out = y * zz * sz
        dz = go * y * sz * (1 + zz * (1 - sz))
        dy = go * zz * sz
    x = Cx * dy[:, :, None, :]
    alpha = torch.ones_like(a)
    alpha[..., :-1] = a[..., 1:]
    g = _scan64(alpha.flip(-1), x.flip(-1)).flip(-1)
    del alpha, x
    hprev = torch.zeros_like(h)
    hprev[..., 1:] = h[..., :-1]
    ga = g * a * hprev
    del hprev
    gB = (g * Bx).sum(2)
    ddl = gB * u + (ga * A[None, :, :, None]).sum(2)
    grads = {"u": gB * dl, "A": (ga * dl[:, :, None, :]).sum((0, 3))}
    if f["D"] is not None:
        grads["u"] = grads["u"] + dy * f["D"][None, :, None]
        grads["D"] = (dy * u).sum((0, 2))
    groups = 1 if f["B"].dim() == 3 else f["B"].shape[1]

    def group_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(bs, groups, dim // groups, *t.shape[2:]).sum(2)
        return t[:, 0] if f["B"].dim() == 3 else t

    grads["B"] = group_sum(g * (dl * u)[:, :, None, :])
    grads["C"] = group_sum(h * dy[:, :, None, :])
    if softplus:
        ddl = ddl * torch.sigmoid(raw)
    grads["delta"] = ddl
    if f["delta_bias"] is not None:
        grads["delta_bias"] = ddl.sum((0, 2))
    if dz is not None:
        grads["z"] = dz
    return out, h[..., -1], grads


CUDA_SHAPES = [(1, 32, 262144, 16, None), (2, 64, 32768, 16, None), (8, 128, 16384, 16, None),
               (2, 256, 512, 16, None), (2, 64, 4096, 16, 4)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) +
                         (f"_G{s[4]}" if s[4] else ""))
def test_cuda_full_shapes(shape, dtype) -> None:
    from napari_medmamba.ssm.triton import selective_scan_triton

    bs, dim, length, n, groups = shape
    ins = make_inputs((bs, dim, length, n), groups, dtype=dtype, device="cuda", seed=length)
    leaves = {k: v.clone().requires_grad_(True) for k, v in ins.items() if v is not None}
    out, last = selective_scan_triton(**leaves, delta_softplus=True, return_last_state=True)
    dout = torch.randn(out.shape, device="cuda").to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    # the no-grad path must give the same output
    with torch.no_grad():
        out_ng = selective_scan_triton(**ins, delta_softplus=True)
    torch.cuda.synchronize()
    ref_out, ref_last, ref_grads = ref64_with_grads(ins, dout, True)
    tol = TOL[dtype] * (10 if dtype == "float32" else 1)
    assert rel_rms(out, ref_out) <= tol
    assert rel_rms(out_ng, ref_out) <= tol
    assert rel_rms(last, ref_last) <= tol
    for k, gr in zip(leaves, grads):
        assert gr.dtype == leaves[k].dtype, k
        assert rel_rms(gr, ref_grads[k]) <= tol, (k, rel_rms(gr, ref_grads[k]))


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
