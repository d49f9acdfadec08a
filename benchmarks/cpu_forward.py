"""LightM-UNet 3D forward on the CPU: PyTorch ops against our fused numba layers and heap reuse, in one run.

    python benchmarks/cpu_forward.py                       # shipped hippocampus and CT models, markdown table
    python benchmarks/cpu_forward.py --shapes 40x56x40 --rounds 9 --json out.json

Variants, timed in interleaved rounds (one forward each per round, so machine noise hits all alike):
``torch``: PyTorch ops (``MEDMAMBA_CPU_LAYERS=0``), glibc's allocation policy; ``layers``: the numba kernels of
``napari_medmamba.ssm._cpu_numba_layers`` (causal conv1d + SiLU, channels-first LayerNorm, narrow channel
mix) on whole sequences; ``layers+heap``: also inside ``reuse_large_allocations``; ``pieces+heap``: the Mamba
layers run token-major piece by piece (``MambaLayer._forward_pieces``, the kernels of ``_cpu_numba_tokens``),
inside ``reuse_large_allocations``, with float32 projections; ``pieces+heap+bf16``: the same with the
pieces' projections as bfloat16 products (``mamba.piece_product_dtype``): what ``segment()`` does on a CPU
with native bf16 products (on others it is the float32 variant again). Every other variant keeps float32
products (``MEDMAMBA_CPU_BF16=0``). The first three set ``lightm_unet.PIECE_TOKENS = 0``. The selective scan is
a numba CPU scan in every variant. Prints the median ms and the ratio to ``torch``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medmamba.large_allocations import reuse_large_allocations  # noqa: E402
from napari_medmamba.models import lightm_unet  # noqa: E402
from napari_medmamba.models.checkpoints import load_checkpoint  # noqa: E402
from napari_medmamba.models.mamba import CPU_BF16_ENV, CPU_LAYERS_ENV  # noqa: E402
from napari_medmamba.models.registry import WEIGHTS_DIR, get_model_spec  # noqa: E402

DEFAULT_CASES = ("lightm_unet_3d:40x56x40", "lightm_unet_3d_hn_oar:64x96x128")
"""The hippocampus model at its patch; the CT model at a typical body box of a 128^3 OpenKBP case."""

VARIANTS = ("torch", "layers", "layers+heap", "pieces+heap", "pieces+heap+bf16")
_PIECE_TOKENS = lightm_unet.PIECE_TOKENS


def _variant(name: str):
    os.environ[CPU_LAYERS_ENV] = "0" if name == "torch" else "1"
    os.environ[CPU_BF16_ENV] = "1" if name.endswith("+bf16") else "0"
    lightm_unet.PIECE_TOKENS = _PIECE_TOKENS if name.startswith("pieces") else 0
    return reuse_large_allocations() if "+heap" in name else contextlib.nullcontext()


def run(cases: list[str], rounds: int) -> list[dict]:
    rows = []
    for case in cases:
        model_name, shape = case.split(":")
        spec = get_model_spec(model_name)
        net = load_checkpoint(WEIGHTS_DIR / spec.weights, name=model_name).float().eval()
        x = torch.randn(1, 1, *(int(s) for s in shape.split("x")), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        outputs = {}
        with torch.inference_mode():
            for v in VARIANTS:  # warm-up: kernel compilation, thread pools
                with _variant(v):
                    outputs[v] = net(x)
            for _ in range(rounds):
                for v in VARIANTS:
                    with _variant(v):
                        t0 = time.perf_counter()
                        net(x)
                        times[v].append(time.perf_counter() - t0)
        os.environ.pop(CPU_LAYERS_ENV, None)
        os.environ.pop(CPU_BF16_ENV, None)
        lightm_unet.PIECE_TOKENS = _PIECE_TOKENS
        base = statistics.median(times["torch"])
        for v in VARIANTS:
            med = statistics.median(times[v])
            rows.append({"model": model_name, "shape": shape, "variant": v, "median_ms": round(med * 1e3, 1),
                         "min_ms": round(min(times[v]) * 1e3, 1), "speedup": round(base / med, 2),
                         "max_abs_diff_vs_torch": float((outputs[v] - outputs["torch"]).abs().max())})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="MODEL:ZxYxX")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = run(a.cases, a.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rounds} rounds\n")
    print("| model | input | variant | median ms | min ms | speed-up vs torch | max abs diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['shape']} | {r['variant']} | {r['median_ms']} | {r['min_ms']} | "
              f"{r['speedup']:.2f}x | {r['max_abs_diff_vs_torch']:.1e} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
