"""Sweep the Triton selective scan's launch parameters on a GPU and print a markdown table.

    python benchmarks/scan_sweep.py --shapes 8,128,16384,16 2,64,32768,16 --dtypes fp32 bf16 \
        --configs '{}' '{"fwd_ts": 32}' '{"fwd_ts": 32, "bwd_nt": true}' --json sweep.json

Each ``--configs`` entry is a JSON dict of ``ScanConfig`` overrides (``launch.py``) passed as
``selective_scan_triton(..., config=...)``; ``{}`` is what the dispatcher does on its own. Every config is
timed forward (no grad) and forward + backward on the same inputs as ``benchmarks/scan.py`` (a Mamba-block
call: D, z, delta_bias, softplus), and checked against the first config's output and gradients (relative
RMS). ``mamba_ssm`` is timed too where it is importable. Speed-ups are against the first config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scan import DTYPES, make_inputs, time_cuda  # noqa: E402


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_one(scan, shape, dtype, repeats: int) -> tuple[float, float, list[torch.Tensor]]:
    """(fwd ms, fwd+bwd ms, [out, *grads]) of ``scan(**inputs)``."""
    plain = make_inputs(shape, dtype, "cuda", grad=False)
    with torch.no_grad():
        fwd = time_cuda(lambda: scan(**plain, delta_softplus=True), repeats)
    plain = None  # free the forward-only inputs first
    inputs = make_inputs(shape, dtype, "cuda", grad=True)
    leaves = list(inputs.values())
    dout = torch.randn(shape[:3], device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)

    def fwd_bwd():
        out = scan(**inputs, delta_softplus=True)
        return out, torch.autograd.grad(out, leaves, dout)

    both = time_cuda(fwd_bwd, max(1, repeats // 2 + 1))
    out, grads = fwd_bwd()
    return fwd, both, [out.detach(), *grads]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", required=True, help="B,D,L,N")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--configs", nargs="+", default=["{}"], help="JSON dicts of ScanConfig overrides")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-mamba", action="store_true", help="leave mamba_ssm out even if importable")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from napari_medmamba.ssm.dispatch import available_backends, selective_scan_fn
    from napari_medmamba.ssm.triton.autograd import selective_scan_triton

    configs = [json.loads(c) for c in args.configs]
    rows = []
    print("| shape | dtype | config | fwd ms | fwd+bwd ms | fwd vs first | fwd+bwd vs first | max rel. RMS vs first |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        for dname in args.dtypes:
            first = None
            cands = [(json.dumps(c), (lambda c: lambda **kw: selective_scan_triton(**kw, config=dict(c) or None))(c))
                     for c in configs]
            if not args.no_mamba and "mamba_ssm" in available_backends():
                cands.append(("mamba_ssm", lambda **kw: selective_scan_fn(**kw, backend="mamba_ssm")))
            for label, scan in cands:
                try:
                    fwd, both, res = run_one(scan, shape, DTYPES[dname], args.repeats)
                except Exception as err:  # a config a shape cannot take, or out of registers
                    print(f"| {text} | {dname} | {label} | failed: {type(err).__name__}: {str(err)[:80]} |||||",
                          flush=True)
                    continue
                if first is None:
                    first = (fwd, both, res)
                err = max(rel_rms(a, b) for a, b in zip(res, first[2]))
                rows.append(dict(shape=list(shape), dtype=dname, config=label, fwd_ms=fwd, fwd_bwd_ms=both,
                                 fwd_speedup=first[0] / fwd, fwd_bwd_speedup=first[1] / both, max_rel_rms=err))
                print(f"| {text} | {dname} | {label} | {fwd:.3f} | {both:.3f} | {first[0] / fwd:.2f}x | "
                      f"{first[1] / both:.2f}x | {err:.1e} |", flush=True)
                del res
            torch.cuda.empty_cache()
    if args.json:
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()
