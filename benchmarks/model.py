"""LightM-UNet speed and memory on a GPU (issue #12): the six cases of the issue plus a per-stage profile.

    python benchmarks/model.py                    # all cases on cuda, markdown table on stdout
    python benchmarks/model.py --cases infer3d --profile --json out.json

Cases (as the issue measured the official code): 3D 128^3 inference batch 1 (fp32 and bf16 autocast),
3D 128^3 and 96^3 training steps batch 2 (AdamW, bf16 autocast, loss = CE + soft Dice), 2D 512^2 inference
batch 1, 2D 512^2 training batch 12. Time: median of ``--repeat`` runs after ``--warmup`` (CUDA-synchronised);
memory: ``torch.cuda.max_memory_allocated`` for that case alone. ``--profile`` adds the forward time of each
top-level stage (convInit, each encoder stage, each decoder stage, head) measured with CUDA events.
``--checkpointing [MODE ...]`` (default mode ``layer``) runs every training case again with LightM-UNet's
activation checkpointing on (``set_activation_checkpointing``, levels ``--checkpoint-levels``, default full
and half resolution), one extra row per mode, so both appear in the same run:

    python benchmarks/model.py --cases train3d_128 train3d_96 --checkpointing layer cheap

``--cuda-graphs`` runs every inference case once more replayed from a captured CUDA graph
(``napari_medmamba.models.cuda_graph.GraphedForward``; with ``--official``, the official network too).
Works on CPU too (``--device cpu``, slow: use ``--cases infer3d --size 64``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medmamba.models.cuda_graph import GraphedForward  # noqa: E402
from napari_medmamba.models.lightm_unet import LightMUNet, MambaLayer  # noqa: E402
from napari_medmamba.ssm.dispatch import resolve_backend  # noqa: E402
from napari_medmamba.training.losses import dice_ce_loss  # noqa: E402

CASES = ("infer3d", "infer3d_bf16", "train3d_128", "train3d_96", "infer2d", "train2d")


def _net(spatial_dims: int, device: torch.device) -> torch.nn.Module:
    return LightMUNet(spatial_dims=spatial_dims, init_filters=32, in_channels=1, out_channels=3,
                      blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)).to(device)


def load_official_factory(path: Path):
    """``build_official(spatial_dims) -> nn.Module`` from a user's file outside this repository.

    The official LightM-UNet code is never part of this project: a parity kit on the GPU machine provides a
    file that imports it (from its own checkout, with mamba-ssm built there) and builds the network with the
    same widths, 1 input channel and 3 classes.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("official_factory", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "build_official"):
        raise SystemExit(f"{path}: defines no build_official(spatial_dims) function")
    return module.build_official


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeat: int, peak_from_start: bool = False) -> tuple[float, float]:
    """(median ms, peak MiB) of ``fn``; the peak covers the warm-up too with ``peak_from_start`` (a CUDA graph's
    memory pool is allocated when it is captured, in the first call)."""
    if peak_from_start and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda" and not peak_from_start:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def run_case(case: str, device: torch.device, size3d: int, size2d: int, warmup: int, repeat: int,
             checkpointing: str | None = None, levels: Sequence[int] | None = None, factory=None,
             graph: bool = False) -> dict:
    """One case; ``checkpointing`` (a MambaLayer mode) turns on activation checkpointing at ``levels``;
    ``factory(spatial_dims)`` builds another implementation (the official one) instead of ours; ``graph``
    replays an inference case from a CUDA graph."""
    dims = 2 if "2d" in case else 3
    net = _net(dims, device) if factory is None else factory(dims).to(device)
    if checkpointing:
        net.set_activation_checkpointing(True if levels is None else levels, mode=checkpointing)
    bf16 = case != "infer3d"
    train = case.startswith("train")
    if case == "train3d_96":
        shape, batch = (96,) * 3, 2
    elif dims == 3:
        shape, batch = (size3d,) * 3, 2 if train else 1
    else:
        shape, batch = (size2d,) * 2, 12 if train else 1
    x = torch.randn(batch, 1, *shape, device=device)
    if not train and graph:
        net.eval()
        graphed = GraphedForward(net, max_graphs=1)

        def step():
            with torch.inference_mode():
                graphed(x, bf16)
    elif not train:
        net.eval()

        def step():
            with torch.inference_mode(), _autocast(device, bf16):
                net(x)
    else:
        net.train()
        y = torch.randint(0, 3, (batch, *shape), device=device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step():
            with _autocast(device, bf16):
                logits = net(x)
            loss = dice_ce_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ms, peak = _timed(step, device, warmup, repeat, peak_from_start=graph)
    return {"case": case, "shape": list(shape), "batch": batch, "precision": "bf16 autocast" if bf16 else "fp32",
            "ms": round(ms, 2), "peak_mib": round(peak, 1),
            "checkpointing": _ckpt_label(net) if train and factory is None else "off",
            "impl": ("ours" if factory is None else "official") + (" + CUDA graph" if graph else "")}


def _ckpt_label(net: LightMUNet) -> str:
    on = net.activation_checkpointing
    return "off" if not on else ", ".join(f"L{k} {v}" for k, v in sorted(on.items()))


def profile_stages(device: torch.device, size3d: int, bf16: bool, repeat: int = 5) -> list[dict]:
    """Forward ms of each top-level stage of the 3D net at size3d^3, batch 1 (CUDA events / perf_counter)."""
    net = _net(3, device).eval()
    x = torch.randn(1, 1, *(size3d,) * 3, device=device)
    stages = [("convInit", net.convInit)] + [(f"encoder{i}", m) for i, m in enumerate(net.down_layers)] \
        + [(f"up_sample{i}", m) for i, m in enumerate(net.up_samples)] \
        + [(f"decoder{i}", m) for i, m in enumerate(net.up_layers)] + [("head", net.conv_final)]
    acc: dict[str, list[float]] = {n: [] for n, _ in stages}
    starts: dict[str, float] = {}
    hooks = []
    for name, mod in stages:
        def pre(_m, _i, name=name):
            _sync(device)
            starts[name] = time.perf_counter()

        def post(_m, _i, _o, name=name):
            _sync(device)
            acc[name].append((time.perf_counter() - starts[name]) * 1e3)
        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.inference_mode(), _autocast(device, bf16):
        net(x)
        for v in acc.values():
            v.clear()
        for _ in range(repeat):
            net(x)
    for h in hooks:
        h.remove()
    total = sum(statistics.median(v) for v in acc.values())
    return [{"stage": n, "ms": round(statistics.median(v), 2), "share": round(statistics.median(v) / total, 3)}
            for n, v in acc.items()]


def profile_kernels(device: torch.device, dims: int, size: int, train: bool, top: int, repeat: int = 3) -> list[dict]:
    """The ``top`` operators by self device time (torch.profiler) over ``repeat`` bf16 forwards (batch 1) or
    training steps (3D: batch 2; 2D: batch 12, as the timed cases), per call: where the time goes below the
    stage level."""
    from torch.profiler import ProfilerActivity, profile

    net = _net(dims, device)
    batch = (2 if dims == 3 else 12) if train else 1
    x = torch.randn(batch, 1, *(size,) * dims, device=device)
    y = torch.randint(0, 3, (batch, *(size,) * dims), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        if not train:
            with torch.inference_mode(), _autocast(device, True):
                net.eval()(x)
            return
        with _autocast(device, True):
            loss = dice_ce_loss(net.train()(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(repeat):
            step()
        _sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"op": e.key[:90], "ms_per_call": round(getattr(e, key) / 1e3 / repeat, 3),
             "calls_per_step": round(e.count / repeat, 1), "share": round(getattr(e, key) / total, 3)} for e in rows]


def ratio_table(rows: list[dict]) -> str:
    """Markdown rows; where the official code ran the same case (eagerly), official / ours for time and peak
    memory."""
    official = {r["case"]: r for r in rows if r.get("impl") == "official" and "error" not in r}
    lines = ["| implementation | case | shape x batch | precision | act. checkpointing | ms | peak MiB "
             "| official / ours: time | official / ours: memory |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('impl', 'ours')} | {r['case']} | | | {r['checkpointing']} | {r['error']} | | | |")
            continue
        ref = official.get(r["case"]) if r.get("impl", "ours").startswith("ours") else None
        t = f"{ref['ms'] / r['ms']:.2f}x" if ref else ""
        m = f"{ref['peak_mib'] / r['peak_mib']:.2f}x" if ref and r["peak_mib"] == r["peak_mib"] else ""
        lines.append(f"| {r.get('impl', 'ours')} | {r['case']} | {'x'.join(map(str, r['shape']))} x {r['batch']} "
                     f"| {r['precision']} | {r['checkpointing']} | {r['ms']:.1f} | {r['peak_mib']:.0f} | {t} | {m} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    p.add_argument("--size", type=int, default=128, help="3D edge (default: %(default)s)")
    p.add_argument("--size2d", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also time each stage of the 3D forward")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also list the N operators with the most device time (3D forward and training step)")
    p.add_argument("--official", type=Path, default=None, metavar="FILE.py",
                   help="a file (outside this repository) defining build_official(spatial_dims): the official "
                        "network, run on every case in the same process for same-run ratios")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also run every inference case replayed from a captured CUDA graph")
    p.add_argument("--checkpointing", nargs="*", default=None, choices=MambaLayer.CHECKPOINT_MODES,
                   help="also run each training case with activation checkpointing in these modes "
                        "(no value: layer)")
    p.add_argument("--checkpoint-levels", type=int, nargs="+", default=None,
                   help="resolution levels to checkpoint (default: 0 1, full and half resolution)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    modes = [] if a.checkpointing is None else (a.checkpointing or ["layer"])
    # (case, checkpointing mode, official network?, CUDA graph?)
    runs = [(case, None, False, False) for case in a.cases]
    runs += [(case, m, False, False) for case in a.cases if case.startswith("train") for m in modes]
    factory = load_official_factory(a.official) if a.official else None
    officials = [False, True] if factory is not None else [False]
    runs += [(case, None, True, False) for case in a.cases] if factory is not None else []
    if a.cuda_graphs:
        runs += [(case, None, official, True) for official in officials for case in a.cases if case.startswith("infer")]
    rows = []
    for case, mode, official, graph in runs:
        try:
            rows.append(run_case(case, device, a.size, a.size2d, a.warmup, a.repeat, mode, a.checkpoint_levels,
                                 factory if official else None, graph))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not (graph or isinstance(e, torch.OutOfMemoryError)):
                raise
            what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else "graph capture failed"
            rows.append({"case": case, "checkpointing": mode or "off",
                         "impl": ("official" if official else "ours") + (" + CUDA graph" if graph else ""),
                         "error": f"{what}: {str(e)[:120]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device {name}, torch {torch.__version__}, scan backend {resolve_backend(device)}")
    print(ratio_table(rows))
    out = {"device": name, "torch": torch.__version__, "backend": resolve_backend(device), "cases": rows}
    if a.profile:
        out["stages"] = profile_stages(device, a.size, bf16=True)
        print("\n| stage (3D forward, bf16) | ms | share |\n|---|---|---|")
        for s in out["stages"]:
            print(f"| {s['stage']} | {s['ms']:.2f} | {100 * s['share']:.0f}% |")
    # 3D always; 2D too when a 2D case was asked for
    profiled = [(3, a.size)] + ([(2, a.size2d)] if any("2d" in c for c in a.cases) else [])
    for dims, size in profiled if a.kernels else ():
        for kind, train in (("forward", False), ("training step", True)):
            rows_k = profile_kernels(device, dims, size, train, a.kernels)
            out[f"kernels_{'' if dims == 3 else '2d_'}{kind.replace(' ', '_')}"] = rows_k
            print(f"\n| operator ({dims}D {kind}, bf16, {size}^{dims}) | ms per step | calls per step | share |"
                  "\n|---|---|---|---|")
            for r in rows_k:
                print(f"| {r['op']} | {r['ms_per_call']:.2f} | {r['calls_per_step']:g} | {100 * r['share']:.1f}% |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
