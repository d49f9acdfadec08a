"""Short-sequence (single-launch) Triton selective scan: values and all gradients against the
float64 reference, routing between the short and the chunked path.

Like tests/test_ssm_triton.py, the kernels run through Triton's interpreter in ONE subprocess
(TRITON_INTERPRET must be set before triton is imported and must not leak into this pytest
process); each case's relative RMS errors and the path that ran come back as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ssm_triton import make_inputs, rel_rms, run_interpreter_worker  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 3e-3}

# path: the path the call must take ("short" / "chunked"); cfg: the config= argument.
CASES = {
    "L1_all_options": dict(shape=(1, 4, 1, 4), path="short"),
    "L7_batch2_ck3": dict(shape=(2, 4, 7, 4), cfg=dict(short_ck=3), path="short"),
    "L7_no_last_state": dict(shape=(1, 4, 7, 4), last=False, path="short"),
    "L64_G2_N16_blocks": dict(shape=(1, 8, 64, 16), groups=2,
                              cfg=dict(short_block_d=2, short_ck=16), path="short"),
    "L64_G2_dpg3_N3_masked": dict(shape=(1, 6, 64, 3), groups=2, z=False,
                                  cfg=dict(short_block_d=2), path="short"),
    "L300_plain": dict(shape=(1, 2, 300, 4), z=False, D=False, bias=False, softplus=False,
                       path="short"),
    "L300_all_options_auto": dict(shape=(1, 2, 300, 4), path="short"),
    "bf16_L64_G2": dict(shape=(2, 4, 64, 4), groups=2, dtype="bfloat16", path="short"),
    "bf16_L64_blocks": dict(shape=(1, 4, 64, 4), dtype="bfloat16",
                            cfg=dict(short_block_d=2, short_ck=8), path="short"),
    "fp16_L7": dict(shape=(1, 4, 7, 4), dtype="float16", bias=False, path="short"),
    "forced_chunked_L1": dict(shape=(1, 4, 1, 4), cfg=dict(path="chunked"), path="chunked"),
    "forced_chunked_L7_G2": dict(shape=(1, 4, 7, 4), groups=2, cfg=dict(path="chunked"),
                                 path="chunked"),
    "chunked_params_L64": dict(shape=(1, 4, 64, 4), cfg=dict(T=16, chunk_tiles=1),
                               path="chunked"),
}


def _interpreter_worker() -> None:
    """Run every CASE through the interpreter; print {case: {name: value}}."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from napari_medmamba.ssm.reference import selective_scan_ref
    from napari_medmamba.ssm.triton import autograd, is_available, selective_scan_triton, short

    assert is_available()
    ran: list[str] = []
    orig_short, orig_chunked = short.short_forward, autograd.scan_forward

    def spy_short(*a, **k):
        ran.append("short")
        return orig_short(*a, **k)

    def spy_chunked(*a, **k):
        ran.append("chunked")
        return orig_chunked(*a, **k)

    short.short_forward, autograd.scan_forward = spy_short, spy_chunked
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        ins = make_inputs(case["shape"], case.get("groups"), case.get("z", True),
                          case.get("D", True), case.get("bias", True), case.get("softplus", True),
                          case.get("dtype", "float32"), seed=100 + i)
        sp = case.get("softplus", True)
        want_last = case.get("last", True)
        leaves = {k: v.clone().requires_grad_(True) for k, v in ins.items() if v is not None}
        args = {k: leaves.get(k) for k in ins}
        ran.clear()
        res = selective_scan_triton(**args, delta_softplus=sp, return_last_state=want_last,
                                    config=case.get("cfg"))
        out, last = res if want_last else (res, None)
        paths = list(ran)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + i)).to(out.dtype)
        grads = torch.autograd.grad(out, list(leaves.values()), dout)
        with torch.no_grad():  # the no-grad forward (no saved states) must agree
            res_ng = selective_scan_triton(**ins, delta_softplus=sp, return_last_state=want_last,
                                           config=case.get("cfg"))
        out_ng = res_ng[0] if want_last else res_ng
        paths += ran[len(paths):]
        ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
        ref_out, ref_last = selective_scan_ref(**{k: ref_leaves.get(k) for k in ins},
                                               delta_softplus=sp, return_last_state=True)
        ref_grads = torch.autograd.grad(ref_out, list(ref_leaves.values()), dout.double())
        errs = {"out": rel_rms(out, ref_out), "out_no_grad": rel_rms(out_ng, ref_out),
                "out_dtype_ok": float(out.dtype == ins["u"].dtype),
                "paths": paths}
        if want_last:
            errs["last_state"] = rel_rms(last, ref_last)
            errs["last_state_ng"] = rel_rms(res_ng[1], ref_last)
        else:
            errs["no_tuple_ok"] = float(isinstance(res, torch.Tensor))
        for k, g, r in zip(leaves, grads, ref_grads):
            errs[f"d{k}"] = rel_rms(g, r)
            errs[f"d{k}_dtype_ok"] = float(g.dtype == leaves[k].dtype)
            errs[f"d{k}_shape_ok"] = float(g.shape == leaves[k].shape)
        results[name] = errs
    # routing decisions at the threshold (no kernel runs)
    x = torch.zeros(1, 1, 1)
    results["_route"] = {
        "at_max": autograd._route(torch.empty(1, 1, short.SHORT_L_MAX), x, x, None)[0],
        "above_max": autograd._route(torch.empty(1, 1, short.SHORT_L_MAX + 1), x, x, None)[0],
        "forced_short_long": autograd._route(torch.empty(1, 1, short.SHORT_L_MAX + 1), x, x,
                                             {"path": "short"})[0],
        "chunk_params": autograd._route(torch.empty(1, 1, 8), x, x, {"T": 16})[0],
        "short_params": autograd._route(torch.empty(1, 1, 8), x, x, {"short_ck": 4})[0],
        "groups_differ": autograd._route(torch.empty(1, 2, 8), torch.zeros(1, 2, 1, 8), x,
                                         None)[0],
    }
    try:
        autograd._route(torch.empty(1, 1, 8), x, x, {"path": "sideways"})
        results["_route"]["bad_path_raises"] = False
    except ValueError:
        results["_route"]["bad_path_raises"] = True
    print("RESULTS" + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_short_values_and_grads(interpreter_results: dict, case: str) -> None:
    errs = dict(interpreter_results[case])
    spec = CASES[case]
    tol = TOL[spec.get("dtype", "float32")]
    paths = errs.pop("paths")
    # grad call + no-grad call, both on the expected path
    assert paths == [spec["path"]] * 2, paths
    expected = {"out", "out_no_grad", "du", "ddelta", "dA", "dB", "dC"}
    assert expected <= set(errs)
    for key, value in errs.items():
        if key.endswith("_ok"):
            assert value == 1.0, key
        else:
            assert value == value and value <= tol, (key, value, tol)


def test_routing(interpreter_results: dict) -> None:
    r = interpreter_results["_route"]
    assert r == {"at_max": True, "above_max": False, "forced_short_long": True,
                 "chunk_params": False, "short_params": True, "groups_differ": False,
                 "bad_path_raises": True}


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
