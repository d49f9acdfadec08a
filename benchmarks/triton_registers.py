"""Registers, spills and instruction mix of the Triton scan's kernels compiled for a GPU, without a GPU.

    python benchmarks/triton_registers.py --shapes 2,64,262144,16 --dtypes fp32 bf16 \
        [--override '{"bwd_num_warps": 2}'] [--arch 90] [--sms 132] [--json out.json]

Runs the chunked scan's host code (``scan_forward`` with saved states, then ``scan_backward``) on CPU tensors of
the shape with the kernel launches captured instead of run, so every kernel gets the arguments, launch
parameters (``launch.choose_config`` for a GPU of ``--sms`` multiprocessors, plus ``--override``) and
specialisation Triton itself would give it. Each is compiled by Triton for ``sm_<arch>`` with the ptxas it
ships, and the cubin is read with its cuobjdump: registers per thread, stack (spills), SASS instruction counts.

Registers bound occupancy before anything is measured: an H100 multiprocessor has 65 536 registers, allocated
per warp in units of 256, and holds at most 64 warps and 32 programs. A kernel whose programs are one warp of 255
registers keeps at most 8 warps per multiprocessor (2 per scheduler) to hide the latency of its loads, shuffles
and exp2s. Timings need a GPU (``benchmarks/scan.py``, ``benchmarks/scan_sweep.py``); this tells which launch
parameters are worth timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 65536, 64, 32
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def capture_launches(shape: tuple[int, int, int, int], dtype: torch.dtype, sms: int, override: dict) -> list[tuple]:
    """(kernel, grid, args, meta) of every Triton launch of one forward (saving states, with D, z, delta_bias,
    softplus: a Mamba block's call) and backward of the chunked scan; nothing runs."""
    from napari_medmamba.ssm.triton import autograd, launch

    captured: list[tuple] = []
    real_launch, real_sms = autograd.launch, launch._sm_count
    autograd.launch = lambda fn, grid, *args, **meta: captured.append((fn, grid, args, meta))
    launch._sm_count = lambda device: sms
    launch._choose_config.cache_clear()
    try:
        batch, dim, length, n = shape
        g = torch.Generator().manual_seed(0)
        x = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
        u, delta, z, B, C = x(batch, dim, length), x(batch, dim, length), x(batch, dim, length), \
            x(batch, n, length), x(batch, n, length)
        A, D, bias = -torch.rand(dim, n, generator=g), torch.randn(dim, generator=g), torch.randn(dim, generator=g)
        _, _, saved, cfg = autograd.scan_forward(u, delta, A, B, C, D, z, bias, True, True, False, **override)
        autograd.scan_backward(x(batch, dim, length), u, delta, A, B, C, D, z, bias, True, saved, cfg)
    finally:
        autograd.launch, launch._sm_count = real_launch, real_sms
        launch._choose_config.cache_clear()
    return captured


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: this needs a Triton wheel that ships the CUDA tools (pip install triton)")
    return str(path)


def compile_launch(fn, args: tuple, meta: dict, arch: int):
    """Triton's own specialisation of this launch (as ``JITFunction.run`` makes it), compiled for sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(meta, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def cubin_report(cubin: bytes) -> dict:
    """Registers, stack and shared bytes, and SASS instruction counts of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops: Counter = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "shared_bytes": int(fields.get("SHARED", 0)), "sass": dict(ops)}


def resident_warps(registers: int, warps_per_program: int) -> int:
    """Warps one multiprocessor holds at once given the registers per thread (allocated per warp in units of
    256), at most 64 warps and 32 programs."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    programs = min(MAX_PROGRAMS_PER_SM, REGISTERS_PER_SM // (per_warp * warps_per_program))
    return min(MAX_WARPS_PER_SM, programs * warps_per_program)


def analyse(shape, dtype_name: str, sms: int, override: dict, arch: int) -> list[dict]:
    rows = []
    for fn, grid, args, meta in capture_launches(shape, DTYPES[dtype_name], sms, override):
        warps = int(meta.get("num_warps", 4))
        rep = cubin_report(compile_launch(fn, args, meta, arch).asm["cubin"])
        sass = rep.pop("sass")
        programs = 1
        for g in grid:
            programs *= int(g)
        rows.append({"shape": list(shape), "dtype": dtype_name, "kernel": fn.__name__, "programs": programs,
                     "warps_per_program": warps, **rep, "resident_warps_per_sm": resident_warps(rep["registers"], warps),
                     "constexprs": {k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS},
                     "maxnreg": meta.get("maxnreg"), "sass_instructions": sum(sass.values()),
                     **{f"sass_{op}": sass.get(op, 0) for op in ("SHFL", "MUFU", "LDG", "STG", "LDL", "STL", "FFMA")}})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | dtype | kernel | programs | warps / program | registers / thread | stack B | resident warps / SM "
             "| SASS instr. | SHFL | MUFU | LDL / STL |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| ({','.join(map(str, r['shape']))}) | {r['dtype']} | {r['kernel']} | {r['programs']} "
                     f"| {r['warps_per_program']} | {r['registers']} | {r['stack_bytes']} | {r['resident_warps_per_sm']} "
                     f"| {r['sass_instructions']} | {r['sass_SHFL']} | {r['sass_MUFU']} | {r['sass_LDL']} / {r['sass_STL']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["2,64,262144,16"], help="B,D,L,N (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--override", default="{}", help="JSON dict of ScanConfig overrides (launch.py)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: %(default)s, Hopper)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU to plan for (H100 SXM: 132)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set to silence its warning
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/triton_registers.py needs triton (pip install triton)") from None
    override = json.loads(a.override)
    rows = []
    for text in a.shapes:
        shape = tuple(int(v) for v in text.split(","))
        for dtype_name in a.dtypes:
            rows += analyse(shape, dtype_name, a.sms, override, a.arch)
    print(f"sm_{a.arch}, launch parameters for {a.sms} multiprocessors, overrides {override or 'none'}\n")
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
