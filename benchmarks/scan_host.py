"""Host microseconds per selective-scan call on a GPU: what a call costs the CPU while the GPU runs ahead.

    python benchmarks/scan_host.py [--backends triton mamba_ssm] [--n 300] [--profile] [--json out.json]
    python .parity/bench_scan.py SITE benchmarks/scan_host.py --backends triton mamba_ssm   # with mamba-ssm

For each shape (issue #5's short and mid-length rows), dtype and backend: ``--n`` forward calls, then ``--n``
forward + backward calls (``torch.autograd.grad`` on every input), with no synchronisation inside the loop.
``host us``: wall time of the loop per call (the CPU's cost: launches, allocations, autograd); ``wall us``: the
same until the GPU has finished too. Where host us is close to wall us, the call is host-bound. ``--profile``
also prints a cProfile of our forward + backward for two shapes. Inputs as in benchmarks/scan.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan as scan_bench  # noqa: E402

SHAPES = [(1, 384, 4, 16), (1, 128, 560, 16), (1, 64, 2240, 16), (1, 256, 16384, 16), (2, 64, 32768, 16),
          (8, 128, 16384, 16)]


def _per_call_us(fn, n: int) -> tuple[float, float]:
    """(host us, wall us) per call of ``fn`` over ``n`` calls after 20 warm-up calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t0) / n


def measure(shape, dtype_name: str, backend: str, n: int, profile: bool) -> dict:
    scan = scan_bench.scan_function(backend)
    inputs = scan_bench.make_inputs(shape, scan_bench.DTYPES[dtype_name], "cuda", grad=True)
    leaves = list(inputs.values())
    dout = torch.randn(shape[:3], device="cuda").to(scan_bench.DTYPES[dtype_name])

    def forward():
        with torch.no_grad():
            scan(**inputs, delta_softplus=True)

    def forward_backward():
        torch.autograd.grad(scan(**inputs, delta_softplus=True), leaves, dout)

    row = {"shape": list(shape), "dtype": dtype_name, "backend": backend}
    row["fwd_host_us"], row["fwd_wall_us"] = _per_call_us(forward, n)
    row["fwd_bwd_host_us"], row["fwd_bwd_wall_us"] = _per_call_us(forward_backward, n)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            forward_backward()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue()[:6000])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="*", default=["triton", "mamba_ssm"])
    p.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=list(scan_bench.DTYPES))
    p.add_argument("--n", type=int, default=300, help="calls per timing (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="cProfile our fp32 forward + backward at L = 4 and 16384")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("scan_host.py needs a CUDA GPU (it times host cost while the GPU runs ahead)", file=sys.stderr)
        return 2
    rows = []
    print("| shape | dtype | backend | fwd host us | fwd wall us | fwd+bwd host us | fwd+bwd wall us |\n|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype_name in a.dtypes:
            for backend in a.backends:
                try:
                    row = measure(shape, dtype_name, backend, a.n,
                                  a.profile and backend == "triton" and shape[2] in (4, 16384) and dtype_name == "fp32")
                except Exception as error:  # noqa: BLE001 - e.g. mamba-ssm missing: report and go on
                    print(f"{shape} {dtype_name} {backend}: {error!r}"[:300], file=sys.stderr)
                    continue
                rows.append(row)
                print(f"| {tuple(shape)} | {dtype_name} | {backend} | {row['fwd_host_us']:.0f} | {row['fwd_wall_us']:.0f} "
                      f"| {row['fwd_bwd_host_us']:.0f} | {row['fwd_bwd_wall_us']:.0f} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
