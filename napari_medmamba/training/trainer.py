"""Time-budgeted training of a registered model from a preprocessed cache, with resumable checkpoints,
final validation (per-class Dice with bootstrap 95% CIs), fp16 safetensors weights and a model card.

Run as ``python -m napari_medmamba.training.trainer --model lightm_unet_3d --cache X.npz --out DIR
--budget-s 300``. Needs NumPy, torch and safetensors only (no SimpleITK, napari or Qt).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic_write import atomic_write
from ..inference.planner import choose_device
from ..large_allocations import reusing_large_allocations_on_cpu
from ..models.checkpoints import save_weights
from ..models.registry import InputContract, get_model_spec
from ..models.zoo import build_model
from ..ssm.dispatch import ENV_VAR, resolve_backend
from .augment import AugmentConfig, PatchSampler, augment_batch
from .dataset import CachedCases
from .losses import dice_ce_loss, dice_per_class
from .splits import DEFAULT_SPLIT, load_split

__all__ = ["train", "evaluate", "bootstrap_ci", "main", "CITATIONS"]

CITATIONS = [
    "Simpson AL et al. A large annotated medical image dataset for the development and evaluation of "
    "segmentation algorithms. arXiv:1902.09063 (2019).",
    "Antonelli M et al. The Medical Segmentation Decathlon. Nature Communications 13, 4128 (2022).",
]
WARMUP_STEPS = 50


def _lr_factor(step: int, elapsed: float, budget_s: float, max_steps: int | None) -> float:
    """Linear warm-up over the first steps, then poly (0.9) decay over the time (or step) budget."""
    frac = step / max_steps if max_steps else elapsed / max(budget_s, 1e-9)
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return warm * max(0.0, 1.0 - min(frac, 1.0)) ** 0.9


def _autocast(device: torch.device, amp: str):
    if device.type == "cuda" and amp == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and amp == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def _fallback(device: torch.device, amp: str) -> str | None:
    """What to try when the first training step fails: fp32, then the chunked-PyTorch scan backend."""
    if amp != "none":
        return "amp=none"
    if device.type == "cuda" and os.environ.get(ENV_VAR, "auto") in {"", "auto", "triton"}:
        return f"{ENV_VAR}=torch"
    return None


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def _rng_state(rng: np.random.Generator, device: torch.device) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng(rng: np.random.Generator, state: dict, device: torch.device) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (cases resampled with replacement)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@torch.no_grad()
def evaluate(model: torch.nn.Module, cases: CachedCases, num_classes: int, device: torch.device,
             amp: str = "bf16", multiple: int = 8, spatial_dims: int = 3) -> np.ndarray:
    """Per-case, per-foreground-class Dice (n_cases, num_classes - 1): each whole volume (2D models: each
    axial slice, all slices as one batch) zero-padded at the end to a multiple of ``multiple``, one forward
    pass, argmax. NaN where a case did not contour the class."""
    model.eval()
    out = []
    for image, label in zip(cases.images, cases.labels):
        shape = image.shape
        pad = [(-s) % multiple for s in shape]
        x = torch.from_numpy(image.astype(np.float32))[None, None].to(device)
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, 0 if spatial_dims == 2 else pad[0]))
        if spatial_dims == 2:
            x = x[0].transpose(0, 1)  # (Z, 1, Y, X): slices as a batch
        with _autocast(device, amp):
            logits = model(x)
        if spatial_dims == 2:
            logits = logits.transpose(0, 1)[None]
        pred = logits[0, :, : shape[0], : shape[1], : shape[2]].float().argmax(0).cpu().numpy()
        out.append(dice_per_class(pred, label, num_classes))
    dice = np.stack(out)
    dice[~cases.present_mask(num_classes)[:, 1:]] = np.nan  # an organ a case did not contour is not scored
    return dice


def _summary(dice: np.ndarray, names: Sequence[str], seed: int) -> dict:
    per_class = {}
    for c, name in enumerate(names[1:]):
        lo, hi = bootstrap_ci(dice[:, c], seed=seed)
        per_class[name] = {"mean": float(np.nanmean(dice[:, c])), "ci95": [lo, hi]}
    case_mean = np.nanmean(dice, axis=1)
    lo, hi = bootstrap_ci(case_mean, seed=seed)
    return {"per_class": per_class, "mean_foreground": {"mean": float(np.nanmean(case_mean)), "ci95": [lo, hi]},
            "n_cases": int(dice.shape[0]), "method": "whole volume (CT contracts with body_threshold_hu: the body's "
            "box) padded to a multiple of 8, argmax; "
            "Dice per case; 95% percentile bootstrap over cases (2000 resamples)"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _train_val_ids(cases: CachedCases, val_ids: Sequence[str] | None, split: str | Path | dict | None
                   ) -> tuple[list[str], list[str]]:
    if val_ids is not None:
        val = list(val_ids)
        train_ids = [c for c in cases.case_ids if c not in set(val)]
    else:
        sp = split if isinstance(split, dict) else load_split(split or DEFAULT_SPLIT)
        val = list(sp["val"])
        train_ids = [c for c in sp["train"] if c in set(cases.case_ids)]
    if set(train_ids) & set(val):
        raise ValueError("training and validation cases overlap")
    if not train_ids:
        raise ValueError("no training cases")
    return train_ids, val


def _patch_sampler(cases: CachedCases, contract: InputContract, patch: tuple[int, ...], stride: int) -> PatchSampler:
    """Patches as the engine will tile: for a CT contract with ``body_threshold_hu``, from volumes cut to the
    body's box, no larger than the batch's boxes and padded with air; otherwise fixed patches padded with 0."""
    if contract.body_threshold_hu is None or contract.spatial_dims == 2:
        return PatchSampler(cases.images, cases.labels, patch)
    body = cases.cropped_to_body(contract, stride)
    air = float(min(image.min() for image in cases.images))  # the CT window's lower end, normalised
    return PatchSampler(body.images, body.labels, patch, pad_value=air, cap_multiple=stride)


@reusing_large_allocations_on_cpu
def train(model_name: str, cache_npz: str | Path, out_dir: str | Path, *, budget_s: float,
          val_ids: Sequence[str] | None = None, split: str | Path | dict | None = None, batch_size: int = 8,
          lr: float = 2e-3, weight_decay: float = 3e-5, seed: int = 0, device: str = "auto", amp: str = "bf16",
          resume: bool = True, checkpoint_every_s: float = 60.0, log: Callable[[str], Any] = print,
          patch_size: Sequence[int] | None = None, max_steps: int | None = None, log_every_s: float = 10.0,
          augment: AugmentConfig = AugmentConfig(), init_weights: str | Path | None = None,
          activation_checkpointing: bool | Sequence[int] = False, ce_top_k: float | None = None,
          class_balanced_ce: float = 0.0, width: int | None = None) -> dict:
    """Train ``model_name`` on the cache's training cases for ``budget_s`` seconds (or ``max_steps``).

    Validation cases come from ``val_ids``, else from the ``split`` JSON (default: the shipped MSD
    hippocampus split); they are never trained on. ``init_weights`` (safetensors of the same architecture)
    starts from those weights instead of a fresh initialisation (a warm restart: new optimiser). ``ce_top_k``:
    cross-entropy over that fraction of the hardest voxels; ``class_balanced_ce``: weight of a per-class averaged
    cross-entropy term (both: see :func:`dice_ce_loss`). ``width``: the network's first-level channels instead of
    the registered ones (see :func:`~napari_medmamba.models.zoo.build_model`). Writes ``checkpoint.pt`` (resumed when present and
    ``resume``), ``weights.safetensors`` (fp16) and ``model_card.json`` to ``out_dir``; returns the card.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = choose_device(device)
    spec = get_model_spec(model_name)
    contract = spec.contract
    patch = tuple(patch_size or contract.patch_size)
    two_d = contract.spatial_dims == 2
    if two_d:  # 2D models train on single axial slices, rotated in-plane only
        patch = (1, *patch[-2:])
        augment = dataclasses.replace(augment, in_plane_only=True)
    cases = CachedCases.load(cache_npz)
    train_ids, val = _train_val_ids(cases, val_ids, split)
    train_set, val_set = cases.subset(train_ids), cases.subset(val)
    present = torch.from_numpy(train_set.present_mask(contract.num_classes))
    partial = not bool(present.all())

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(model_name, width=width)
    if init_weights is not None:
        from ..models.checkpoints import load_checkpoint

        model = load_checkpoint(init_weights, model=model).float()
        log(f"initialised from {Path(init_weights).name}")
    model = model.to(dev)
    stride = int(getattr(model, "stride", 1) or 1)
    sampler = _patch_sampler(train_set, contract, patch, stride)
    if contract.body_threshold_hu is not None and not two_d:  # validate as the engine segments: on the body's box
        val_set = val_set.cropped_to_body(contract, stride)
    checkpointed: list[int] = []
    if activation_checkpointing is not False and hasattr(model, "set_activation_checkpointing"):
        # recompute the Mamba layers of these resolution levels in backward (issue #12); True: levels 0 and 1
        model.set_activation_checkpointing(activation_checkpointing)
        checkpointed = sorted(model.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step, elapsed, resumed_from = 0, 0.0, None
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if state.get("model_name") != model_name:
            raise ValueError(f"{ckpt_path} is for model {state.get('model_name')!r}, not {model_name!r}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, resumed_from = int(state["step"]), float(state["elapsed"]), int(state["step"])
        _restore_rng(rng, state["rng"], dev)
        log(f"resumed from {ckpt_path} at step {step}, {elapsed:.0f} s")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{model_name}: {n_params:,} parameters on {dev}; {len(train_ids)} train / {len(val)} val cases; "
        f"patch {patch}, batch {batch_size}, budget {budget_s:.0f} s, amp {amp}, scan backend {resolve_backend(dev)}")

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                     "elapsed": elapsed, "rng": _rng_state(rng, dev), "model_name": model_name,
                                     "seed": seed, "budget_s": float(budget_s)})

    amp_now, skipped, loss_ema = amp, 0, None
    model.train()
    start = time.perf_counter() - elapsed
    last_log = last_ckpt = time.perf_counter()
    steps_at_log = step
    while (max_steps is None or step < max_steps) and (max_steps is not None or elapsed < budget_s):
        xb, yb, case_idx = sampler.sample_with_cases(batch_size, rng)
        x = torch.from_numpy(xb).to(dev, non_blocking=True)
        y = torch.from_numpy(yb).to(dev, non_blocking=True)
        rows = present[case_idx].to(dev) if partial else None
        x, y, _, rows = augment_batch(x, y, rng, augment, lr_label_pairs=contract.lr_label_pairs, present=rows)
        if two_d:
            x, y = x[:, :, 0], y[:, 0]
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step, elapsed, budget_s, max_steps)
        first = step == (resumed_from or 0)
        try:
            with _autocast(dev, amp_now):
                logits = model(x)
            loss = dice_ce_loss(logits, y, present=rows, ce_top_k=ce_top_k,
                                    class_balanced_ce=class_balanced_ce)
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
        except (RuntimeError, ValueError, TypeError, ImportError) as e:
            fallback = _fallback(dev, amp_now) if first else None
            if fallback is None:
                raise
            log(f"first step failed ({type(e).__name__}: {str(e)[:300]}); retrying with {fallback}")
            opt.zero_grad(set_to_none=True)
            if fallback == "amp=none":
                amp_now = "none"
            else:
                os.environ[ENV_VAR] = "torch"
            continue
        if finite:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            opt.step()
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
        else:
            skipped += 1
        step += 1
        now = time.perf_counter()
        elapsed = now - start
        if now - last_log >= log_every_s:
            log(f"step {step} loss {float('nan') if loss_ema is None else loss_ema:.4f} {(step - steps_at_log) / (now - last_log):.2f} it/s "
                f"elapsed {elapsed:.0f}/{budget_s:.0f} s lr {opt.param_groups[0]['lr']:.2e}"
                + (f" skipped(non-finite) {skipped}" if skipped else ""))
            last_log, steps_at_log = now, step
        if now - last_ckpt >= checkpoint_every_s:
            checkpoint()
            last_ckpt = now
    checkpoint()
    log(f"training done: {step} steps, {elapsed:.0f} s; validating on {len(val)} cases")

    dice = evaluate(model, val_set, contract.num_classes, dev, amp_now,
                    multiple=int(getattr(model, "stride", 8) or 8), spatial_dims=contract.spatial_dims)
    summary = _summary(dice, contract.label_names, seed)
    fp16 = copy.deepcopy(model).cpu().half()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    weights = save_weights(fp16, out / "weights.safetensors", {
        "model_name": model_name, "steps": step, "train_seconds": round(elapsed, 1), "seed": seed,
        "val_dice": {k: v["mean"] for k, v in summary["per_class"].items()},
        "data_licence": cases.meta.get("licence") or "CC BY-SA 4.0", "dtype": "float16"})
    card = {
        "model_name": model_name, "architecture": type(model).__name__,
        "architecture_config": getattr(model, "arch_config", None), "description": spec.description,
        "parameters": int(sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())),
        "weights_file": weights.name, "weights_sha256": _sha256(weights), "weights_dtype": "float16",
        "training_data": {"name": cases.meta.get("source") or "MSD Task04 Hippocampus",
                          "licence": cases.meta.get("licence") or "CC BY-SA 4.0",
                          "citation": cases.meta.get("citation") or CITATIONS,
                          "partial_labels": partial,
                          "train_cases": len(train_ids), "val_cases": val},
        "input_contract": {"spatial_dims": contract.spatial_dims, "in_channels": contract.in_channels,
                           "patch_size": list(contract.patch_size), "target_spacing_zyx_mm": contract.target_spacing,
                           "orientation": contract.orientation, "modality": contract.modality,
                           "normalization": contract.normalization,
                           "lr_label_pairs": [list(pair) for pair in contract.lr_label_pairs],
                           "body_threshold_hu": contract.body_threshold_hu, "max_tile_growth": contract.max_tile_growth},
        "labels": [{"value": i, "name": n, "color": c}
                   for i, (n, c) in enumerate(zip(contract.label_names, contract.label_colors))],
        "validation_dice": summary,
        "training": {"steps": step, "seconds": round(elapsed, 1), "device": device_name, "amp": amp_now if dev.type == "cuda" else "none",
                     "batch_size": batch_size, "patch_size": list(patch), "optimizer": "AdamW",
                     "lr": lr, "weight_decay": weight_decay, "schedule": f"linear warm-up {WARMUP_STEPS} steps, "
                     "poly(0.9) over the time budget",
                     "loss": ("cross-entropy" if ce_top_k is None else f"top-{ce_top_k:g} cross-entropy (hardest voxels)")
                     + (f" + {class_balanced_ce:g} x class-balanced cross-entropy" if class_balanced_ce else "")
                     + " + soft Dice (foreground, batch)"
                     + ("; partial labels: marginal (uncontoured organs merged into background, not taught as it)"
                        if partial else ""),
                     "cases": ("cut to the body's box as the engine does (body_threshold_hu, 12 mm margin); patches "
                               "no larger than the batch's boxes, padded with air; validated on the boxes"
                               if contract.body_threshold_hu is not None and not two_d else "whole volumes"),
                     "augmentation": {k: v for k, v in vars(augment).items()}, "seed": seed,
                     "non_finite_steps_skipped": skipped, "ssm_backend": resolve_backend(dev), "resumed_from_step": resumed_from,
                     "initialised_from": None if init_weights is None else Path(init_weights).name,
                     "activation_checkpointing_levels": checkpointed,
                     "torch": torch.__version__},
        "intended_use": "Research only. Not a medical device; not for clinical decisions.",
    }
    atomic_write(out / "model_card.json", (json.dumps(card, indent=1) + "\n").encode())
    log("val Dice: " + ", ".join(f"{k} {v['mean']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]"
                                  for k, v in summary["per_class"].items()))
    return card


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time-budgeted training from a napari-medmamba cache (.npz).")
    p.add_argument("--model", default="lightm_unet_3d")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--split", default=None, help="split JSON (default: the shipped MSD hippocampus split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=3e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--checkpoint-every-s", type=float, default=60.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--patch-size", type=int, nargs="+", default=None)
    p.add_argument("--init-weights", default=None, help="safetensors to start from (warm restart)")
    p.add_argument("--activation-checkpointing", type=int, nargs="*", default=None, metavar="LEVEL",
                   help="recompute the Mamba layers of these resolution levels in backward (less memory, more time); "
                        "no value: 0 1 (full and half resolution). 3D 128^3, batch 2, H200: level 0 alone 394 ms and "
                        "17.7 GiB per step, against 363 ms and 31.8 GiB without (docs/benchmarks.md)")
    p.add_argument("--ce-top-k", type=float, default=None,
                   help="cross-entropy over this fraction of the hardest voxels only (e.g. 0.1; default: all)")
    p.add_argument("--class-balanced-ce", type=float, default=0.0,
                   help="weight of an extra cross-entropy averaged per class first (default 0; at 1.0 it made the CT model worse, docs/training.md)")
    p.add_argument("--width", type=int, default=None,
                   help="first-level channels of the network (default: the registered model's; each level doubles)")
    a = p.parse_args(argv)
    card = train(a.model, a.cache, a.out, budget_s=a.budget_s, split=a.split, batch_size=a.batch_size, lr=a.lr,
                 weight_decay=a.weight_decay, seed=a.seed, device=a.device, amp=a.amp, resume=not a.no_resume,
                 checkpoint_every_s=a.checkpoint_every_s, max_steps=a.max_steps, patch_size=a.patch_size,
                 init_weights=a.init_weights,
                 activation_checkpointing=(False if a.activation_checkpointing is None
                                           else a.activation_checkpointing or True),
                 ce_top_k=a.ce_top_k, class_balanced_ce=a.class_balanced_ce, width=a.width,
                 log=lambda s: print(s, flush=True))
    print(json.dumps(card["validation_dice"]["per_class"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
