"""Benchmark the selective-scan backends and print a markdown table.

CPU (default):  python benchmarks/scan.py
    backends cpu (numba) and torch (chunked, the baseline), float32, on (1,32,262144,16),
    (2,64,32768,16) and the scan shapes of every registered model at its default input.
CUDA:           python benchmarks/scan.py --device cuda --json scan_cuda.json
    backends triton, mamba_ssm (if importable) and torch, float32 and bfloat16, on the CPU
    shapes plus (8,128,16384,16) and (2,256,512,16); also GB/s and % of --hbm-peak-gbs.

Every call is a Mamba-block call: D, z, delta_bias, delta_softplus=True, B/C ungrouped.
Shapes are (B, D, L, N): batch, channels, sequence length, state size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_medmamba.ssm.dispatch import available_backends, selective_scan_fn  # noqa: E402

Shape = tuple[int, int, int, int]
CPU_SHAPES: list[Shape] = [(1, 32, 262144, 16), (2, 64, 32768, 16)]
CUDA_EXTRA_SHAPES: list[Shape] = [(8, 128, 16384, 16), (2, 256, 512, 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES_NOTE = ("GB/s counts the minimal traffic: forward reads u, delta, z, B, C and writes out; "
              "fwd+bwd adds reading u, delta, z, B, C, dout and writing du, ddelta, dz, dB, dC "
              "(A, D, delta_bias ignored).")


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, grad: bool) -> dict:
    batch, dim, length, n = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0, shift=0.0):
        t = (torch.randn(*size, generator=g) * scale + shift).to(device)
        return t

    inputs = dict(
        u=rand(batch, dim, length).to(dtype), delta=rand(batch, dim, length, scale=0.5, shift=-2.0).to(dtype),
        A=-torch.rand(dim, n, generator=g).mul(15).add(1).to(device), B=rand(batch, n, length).to(dtype),
        C=rand(batch, n, length).to(dtype), D=rand(dim), z=rand(batch, dim, length).to(dtype),
        delta_bias=rand(dim, scale=0.1),
    )
    if grad:
        for t in inputs.values():
            t.requires_grad_()
    return inputs


def model_shapes() -> tuple[dict[Shape, list[str]], str]:
    """Unique (B, D, L, N) of the registered models' scans -> model names; or a note why none."""
    try:
        from napari_medmamba.models.scan_shapes import model_scan_shapes
    except ImportError as err:
        return {}, f"model rows skipped: napari_medmamba.models.scan_shapes not importable ({err})"
    found: dict[Shape, list[str]] = {}
    for model, shapes in model_scan_shapes().items():
        for shape in shapes:
            names = found.setdefault(tuple(shape), [])
            if model not in names:
                names.append(model)
    return found, ""


# ---------------------------------------------------------------- timing
def time_cpu(fn: Callable[[], object], repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_cuda(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds: triton.testing.do_bench when available, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median"))
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(repeats, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def scan_function(backend: str):
    """``selective_scan_fn`` on ``backend``; ``triton:short`` / ``triton:chunked`` force one Triton path."""
    if backend.startswith("triton:"):
        from napari_medmamba.ssm.triton.autograd import selective_scan_triton

        path = backend.split(":", 1)[1]
        return lambda **kw: selective_scan_triton(**kw, config={"path": path})
    return lambda **kw: selective_scan_fn(**kw, backend=backend)


def measure(shape: Shape, dtype: torch.dtype, backend: str, device: str, repeats: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) for one configuration."""
    timer = time_cuda if device == "cuda" else time_cpu
    scan = scan_function(backend)
    plain = make_inputs(shape, dtype, device, grad=False)
    with torch.no_grad():
        fwd = timer(lambda: scan(**plain, delta_softplus=True), repeats)
    plain.clear()  # free the forward-only inputs before the autograd ones are made
    inputs = make_inputs(shape, dtype, device, grad=True)
    leaves = list(inputs.values())
    dout = torch.randn(shape[:3], device=device).to(dtype)

    def fwd_bwd():
        out = scan(**inputs, delta_softplus=True)
        torch.autograd.grad(out, leaves, dout)

    both = timer(fwd_bwd, max(1, repeats // 2 + 1))
    return fwd, both


def minimal_bytes(shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """(forward bytes, forward+backward bytes) as described in BYTES_NOTE."""
    batch, dim, length, n = shape
    size = torch.empty((), dtype=dtype).element_size()
    act, bc = batch * dim * length, batch * n * length
    forward = size * (4 * act + 2 * bc)  # u, delta, z, out; B, C
    backward = size * (4 * act + 2 * bc + 3 * act + 2 * bc)  # read u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC
    return forward, forward + backward


# ---------------------------------------------------------------- table
def shape_label(shape: Shape, models: list[str]) -> str:
    text = "(" + ",".join(str(s) for s in shape) + ")"
    return f"{text} {'/'.join(models)}" if models else text


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    shapes: dict[Shape, list[str]] = {s: [] for s in CPU_SHAPES}
    if device == "cuda":
        shapes.update({s: [] for s in CUDA_EXTRA_SHAPES})
    notes = []
    if not args.no_models:
        found, note = model_shapes()
        if note:
            notes.append(note)
        for shape, models in sorted(found.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]):
            shapes.setdefault(shape, []).extend(models)
    usable = set(available_backends())
    if device == "cuda":
        backends = [b for b in ("triton", "mamba_ssm", "torch") if b in usable]
        if args.skip_torch:
            backends = [b for b in backends if b != "torch"]
        if args.triton_paths and "triton" in usable:  # both Triton paths forced, to place the short/chunked threshold
            backends[1:1] = ["triton:short", "triton:chunked"]
        baseline, dtypes = "mamba_ssm", args.dtypes or ["fp32", "bf16"]
    else:
        backends = [b for b in ("cpu", "torch") if b in usable]
        baseline, dtypes = "torch", args.dtypes or ["fp32"]
    rows = []
    for shape, models in shapes.items():
        for dtype_name in dtypes:
            results = {}
            for backend in backends:
                try:
                    fwd, both = measure(shape, DTYPES[dtype_name], backend, device, args.repeats)
                except (RuntimeError, ValueError) as err:  # e.g. a backend rejecting a shape or running out of memory
                    notes.append(f"{backend} failed on {shape_label(shape, models)} {dtype_name}: {err}")
                    print(f"  {notes[-1]}", file=sys.stderr, flush=True)
                    continue
                results[backend] = (fwd, both)
                row = dict(shape=list(shape), models=models, dtype=dtype_name, backend=backend,
                           forward_ms=fwd, fwd_bwd_ms=both, ratio=both / fwd)
                if device == "cuda":
                    fbytes, bbytes = minimal_bytes(shape, DTYPES[dtype_name])
                    row["forward_gbs"] = fbytes / fwd / 1e6
                    row["fwd_bwd_gbs"] = bbytes / both / 1e6
                    row["forward_pct_peak"] = 100 * row["forward_gbs"] / args.hbm_peak_gbs
                    row["fwd_bwd_pct_peak"] = 100 * row["fwd_bwd_gbs"] / args.hbm_peak_gbs
                rows.append(row)
                print(f"  {shape_label(shape, models)} {dtype_name} {backend}: {fwd:.1f} / {both:.1f} ms",
                      file=sys.stderr, flush=True)
            for row in rows[len(rows) - len(results):]:
                if baseline in results:
                    base_fwd, base_both = results[baseline]
                    row["speedup_forward"] = base_fwd / row["forward_ms"]
                    row["speedup_fwd_bwd"] = base_both / row["fwd_bwd_ms"]
    print_table(rows, device, baseline, notes)
    if args.json:
        meta = dict(device=device, torch=torch.__version__, python=platform.python_version(),
                    machine=platform.machine(), threads=torch.get_num_threads(),
                    gpu=torch.cuda.get_device_name() if device == "cuda" else None,
                    hbm_peak_gbs=args.hbm_peak_gbs, bytes_note=BYTES_NOTE, notes=notes)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    return rows


def print_table(rows: list[dict], device: str, baseline: str, notes: list[str]) -> None:
    header = ["shape (B,D,L,N)", "dtype", "backend", "fwd ms", "fwd+bwd ms", "fwd+bwd / fwd",
              f"fwd speed-up vs {baseline}", f"fwd+bwd speed-up vs {baseline}"]
    if device == "cuda":
        header += ["fwd GB/s", "fwd % peak", "fwd+bwd GB/s", "fwd+bwd % peak"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def speed(row, key):
        return f"{row[key]:.2f}x" if key in row else "n/a"

    for row in rows:
        cells = [shape_label(tuple(row["shape"]), row["models"]), row["dtype"], row["backend"],
                 f"{row['forward_ms']:.1f}", f"{row['fwd_bwd_ms']:.1f}", f"{row['ratio']:.2f}",
                 speed(row, "speedup_forward"), speed(row, "speedup_fwd_bwd")]
        if device == "cuda":
            cells += [f"{row['forward_gbs']:.0f}", f"{row['forward_pct_peak']:.0f}%",
                      f"{row['fwd_bwd_gbs']:.0f}", f"{row['fwd_bwd_pct_peak']:.0f}%"]
        print("| " + " | ".join(cells) + " |")
    print()
    print("Calls: D, z, delta_bias, delta_softplus=True. Times: median wall ms "
          + ("(triton.testing.do_bench or CUDA events)." if device == "cuda" else "of repeats after a warm-up."))
    if device == "cuda":
        print(BYTES_NOTE)
    for note in notes:
        print(note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 on CPU, fp32 bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per forward measurement")
    parser.add_argument("--no-models", action="store_true", help="skip the registered models' scan shapes")
    parser.add_argument("--hbm-peak-gbs", type=float, default=3350.0, help="peak memory bandwidth (H100 SXM: 3350)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--triton-paths", action="store_true",
                        help="CUDA: also time the Triton short and chunked paths forced (triton:short, triton:chunked)")
    parser.add_argument("--skip-torch", action="store_true", help="CUDA: leave out the slow plain-PyTorch backend")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    run(args)


if __name__ == "__main__":
    main()
