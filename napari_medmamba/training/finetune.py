"""Fine-tune a registered model on a user's corrected slices (Qt-free; issue #9).

The supervision is what a human confirmed: :meth:`EditLog.reviewed_mask` (every voxel of a reviewed slice,
plus every voxel the user edited). Every other voxel is *ignored* by the loss (``ignore_mask``), never taken
as background. Each example is prepared exactly as :func:`~napari_medmamba.inference.engine.segment` prepares
a scan for the model's contract (orientation, resampling only when the spacing differs from the contract's,
normalisation), so fine-tuning sees what inference sees.

A fraction of the supervised axial slices (working-grid z, at least one when there are two or more) is held
back: the base model's and the fine-tuned model's Dice on them are reported, and training stops early when that
Dice stops improving (the best state is kept). Nothing here reads or stores paths or identifiers; the data
fingerprint is a sha256 over the prepared training arrays' bytes.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..annotation.edit_log import EditLog
from ..inference.body_crop import normalised_body_box
from ..inference.engine import Cancel, cancel_check
from ..inference.planner import choose_device
from ..inference.preprocessing import (
    normalize,
    plan_orientation,
    resample_linear,
    working_shape,
)
from ..inference.sliding_window import sliding_window, tile_for
from ..io.volume import Geometry, Volume
from ..large_allocations import reusing_large_allocations_on_cpu
from ..models.registry import (
    REGISTRY,
    InputContract,
    ModelSpec,
    get_model_spec,
    register,
)
from ..models.shipped import load_registered_model, sha256_file, weights_path
from ..models.zoo import build_model
from .augment import AugmentConfig, augment_batch
from .losses import dice_ce_loss, dice_per_class
from .model_store import save_finetuned

__all__ = [
    "INTENDED_USE",
    "CorrectionExample",
    "FinetuneResult",
    "PreparedExample",
    "encoder_prefixes",
    "finetune",
    "find_head",
    "prepare_example",
    "register_finetuned",
    "supervision_mask",
    "unregister",
    "widen_head",
]

INTENDED_USE = "Research only. Not a medical device; not for clinical decisions."
INTENSITY_ONLY = AugmentConfig(p_flip_lr=0.0, p_affine=0.0)
"""Light augmentation: intensity scale / shift / gamma / noise only (no geometry)."""
_ENCODERS: dict[str, tuple[str, ...]] = {
    "LightMUNet": ("convInit.", "down_layers."),
    "UNet": ("encoder.",),
    "MHSVM": ("patch_embed.", "layers."),
}
NEW_LABEL_COLORS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
                    "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5")
"""Colours for classes added by ``finetune(new_labels=...)``; those the contract already uses are skipped."""
NEW_CLASS_BIAS_OFFSET = 0.5
"""A new class starts as a copy of the background channel with this much lower bias (never predicted at first,
but close enough to background that a few steps can make it win where it is labelled)."""
NEW_CLASS_LR_FACTOR = 10.0
"""Learning-rate multiplier for the widened classification layer when new classes are added."""
DEFAULT_LR = {"decoder": 1e-3, "full": 3e-4}
"""AdamW learning rate per mode. Decoder mode trains fewer parameters and learned too slowly at 3e-4: simulated
user, 2 shifted cases, 5 corrected slices each, 120 s on 2 CPU threads: Dice on the untouched slices +0.094 at
1e-3 vs +0.034 at 3e-4, on other cases of the same scanner +0.109 vs +0.045 (docs/finetune.md)."""
TRAIN_Z_STRIDES = 2
"""Default training patch depth, in network strides (16 slices for LightM-UNet): the supervision is single
axial slices, so a thin slab around them carries the same supervised voxels as the contract's full-depth patch
at 40 % of the cost per step (LightM-UNet 3D, batch 2, 2 CPU threads: 1.8 s instead of 4.6 s per step; see
docs/finetune.md, simulated-user benchmark)."""
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm3d)


@dataclass
class CorrectionExample:
    """One corrected scan: the scan, its corrected (z, y, x) label map, and the log of what was confirmed."""

    volume: Volume
    labels: np.ndarray
    edit_log: EditLog


@dataclass
class PreparedExample:
    """An example on the model's working grid: normalised image, labels, and the supervised voxels."""

    image: np.ndarray
    """float32 (z, y, x), normalised as the engine normalises."""
    labels: np.ndarray
    """int64 (z, y, x)."""
    supervised: np.ndarray
    """bool (z, y, x): voxels a human confirmed; the loss ignores all others."""


@dataclass
class FinetuneResult:
    model: nn.Module
    """The network with the best weights (CPU, eval mode)."""
    spec: ModelSpec
    """A new spec (not registered; see :func:`register_finetuned`) with the base's contract."""
    base_name: str
    dice_before: dict[str, float]
    """Hard Dice of the base model on the held-back supervised voxels, per class name plus 'mean'."""
    dice_after: dict[str, float]
    steps: int
    """Optimiser steps taken."""
    best_step: int
    """Step whose weights were kept (0: the base weights were never beaten)."""
    seconds: float
    stop_reason: str
    """'max_steps', 'budget', 'early_stop', 'cancelled' or 'no_trainable_slices'."""
    mode: str
    train_slices: int
    heldout_slices: int
    data_fingerprint: str
    history: list[dict] = field(default_factory=list)
    weights_path: Path | None = None
    card_path: Path | None = None
    card: dict = field(default_factory=dict)


# ---- preparation -----------------------------------------------------------------------------------

def supervision_mask(example: CorrectionExample) -> np.ndarray:
    """Voxels that supervise the loss (on the scan's own grid): reviewed slices OR edited voxels."""
    return example.edit_log.reviewed_mask(np.asarray(example.labels).shape)


def _resample_nearest(array: np.ndarray, source: Geometry, target: Geometry, shape: tuple[int, int, int]) -> np.ndarray:
    import SimpleITK as sitk

    image = source.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.int32))))
    f = sitk.ResampleImageFilter()
    f.SetSize(tuple(int(s) for s in shape[::-1]))
    f.SetOutputSpacing(target.spacing)
    f.SetOutputDirection(target.direction)
    f.SetOutputOrigin(target.origin)
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(f.Execute(image))


def prepare_example(example: CorrectionExample, contract: InputContract) -> PreparedExample:
    """Orientation, working spacing (only when it differs) and normalisation, as ``segment`` does them."""
    volume, labels = example.volume, np.asarray(example.labels)
    if not isinstance(volume, Volume):
        raise TypeError("CorrectionExample.volume must be a Volume")
    if labels.shape != volume.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the volume's {volume.shape}")
    if labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    supervised = supervision_mask(example)
    if supervised.any() and (labels[supervised].min() < 0 or labels[supervised].max() >= contract.num_classes):
        raise ValueError(f"supervised labels must lie in 0..{contract.num_classes - 1}")
    orientation = plan_orientation(volume.geometry, volume.shape, contract.orientation)
    grid = orientation.geometry
    image = orientation.apply(volume.array)
    lab = orientation.apply(labels)
    sup = orientation.apply(supervised)
    target = np.asarray(contract.target_spacing or grid.spacing_zyx, dtype=float)
    if not np.allclose(target, grid.spacing_zyx, rtol=1e-4, atol=0):
        work = Geometry(tuple(target[::-1]), grid.origin, grid.direction)  # type: ignore[arg-type]
        shape = working_shape(orientation.shape, grid.spacing_zyx, tuple(target))
        image = resample_linear(np.ascontiguousarray(image), grid, work, shape)
        lab = _resample_nearest(lab, grid, work, shape)
        sup = _resample_nearest(sup, grid, work, shape) > 0
    return PreparedExample(normalize(np.ascontiguousarray(image), contract), np.ascontiguousarray(lab, dtype=np.int64),
                           np.ascontiguousarray(sup, dtype=bool))


def _cropped_to_body(p: PreparedExample, contract: InputContract, multiple: int) -> PreparedExample:
    """``p`` cut to its body's box as the engine cuts a CT (``inference.body_crop``); supervised voxels outside
    the box (air, 12 mm or more from the body) are dropped with it."""
    box = normalised_body_box(p.image, contract, multiple)
    if box is None:
        return p
    return PreparedExample(np.ascontiguousarray(p.image[box]), np.ascontiguousarray(p.labels[box]),
                           np.ascontiguousarray(p.supervised[box]))


def _fingerprint(prepared: Sequence[PreparedExample]) -> str:
    h = hashlib.sha256()
    for p in prepared:
        for a in (p.image, p.labels, p.supervised):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---- model / parameters ------------------------------------------------------------------------------

def _base(model: str | ModelSpec) -> tuple[ModelSpec, nn.Module, str | None]:
    spec = get_model_spec(model) if isinstance(model, str) else model
    if not isinstance(spec, ModelSpec):
        raise TypeError("model must be a registry name or a ModelSpec")
    if spec.contract.spatial_dims != 3:
        raise ValueError(f"fine-tuning supports 3D models only; {spec.name!r} is {spec.contract.spatial_dims}D")
    if spec.weights:
        net, sha = load_registered_model(spec), spec.sha256 or sha256_file(weights_path(spec))  # type: ignore[arg-type]
    elif spec.card.get("finetuned") and spec.name in REGISTRY:
        net, sha = spec.factory(), spec.card.get("weights_sha256")
    else:
        net, sha = build_model(spec.name) if spec.name in REGISTRY else spec.factory(), None
    return spec, net, sha


def encoder_prefixes(net: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the encoder of a known architecture."""
    try:
        return _ENCODERS[type(net).__name__]
    except KeyError:
        raise ValueError(f"no known encoder for {type(net).__name__}; use mode='full'") from None


def _set_trainable(net: nn.Module, mode: str) -> list[str]:
    """Freeze for ``mode``; returns the names of the trainable parameters.

    'decoder': encoder parameters frozen, except the affine parameters of normalisation layers
    (decoder + all norms train). 'full': everything trains.
    """
    if mode == "full":
        for p in net.parameters():
            p.requires_grad_(True)
        return [n for n, _ in net.named_parameters()]
    prefixes = encoder_prefixes(net)
    norm_params = {f"{m_name}.{p_name}" if m_name else p_name
                   for m_name, m in net.named_modules() if isinstance(m, _NORMS)
                   for p_name, _ in m.named_parameters(recurse=False)}
    names = []
    for n, p in net.named_parameters():
        train = not n.startswith(prefixes) or n in norm_params
        p.requires_grad_(train)
        if train:
            names.append(n)
    return names


def find_head(net: nn.Module, num_classes: int) -> tuple[str, nn.Module]:
    """The network's final classification layer: the last convolution (in module order) that produces
    ``num_classes`` channels. Returns its qualified name and the module."""
    found = None
    for n, m in net.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.out_channels == num_classes and m.groups == 1:
            found = (n, m)
    if found is None:
        raise ValueError(f"{type(net).__name__} has no convolution with {num_classes} output channels")
    return found


def widen_head(net: nn.Module, num_classes: int, extra: int, bias_offset: float = NEW_CLASS_BIAS_OFFSET) -> str:
    """Give ``net``'s classification layer ``extra`` more output channels, in place; returns the layer's name.

    Existing channels keep their weights exactly (the existing classes' logits are unchanged); each new channel
    starts as a copy of the background channel (0) with its bias lowered by ``bias_offset``, so the widened
    network predicts what the base predicted until training moves the new logits. ``arch_config['out_channels']``
    (saved with the weights) is updated.
    """
    if extra < 1:
        raise ValueError("extra must be >= 1")
    name, old = find_head(net, num_classes)
    conv = type(old)(old.in_channels, num_classes + extra, old.kernel_size, stride=old.stride, padding=old.padding,
                     dilation=old.dilation, groups=old.groups, bias=True, padding_mode=old.padding_mode)
    conv = conv.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        old_bias = old.bias if old.bias is not None else torch.zeros(num_classes, device=old.weight.device)
        conv.weight[:num_classes] = old.weight
        conv.weight[num_classes:] = old.weight[:1]
        conv.bias[:num_classes] = old_bias
        conv.bias[num_classes:] = old_bias[0] - bias_offset
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, conv)
    config = getattr(net, "arch_config", None)
    if isinstance(config, dict) and config.get("out_channels") == num_classes:
        config["out_channels"] = num_classes + extra
    return name


def _extend_contract(contract: InputContract, new_labels: Sequence[str],
                     new_colors: Sequence[str] | None) -> InputContract:
    new_labels = tuple(str(n) for n in new_labels)
    if any(not n.strip() for n in new_labels):
        raise ValueError("new label names must be non-empty")
    if len(set(new_labels)) != len(new_labels) or set(new_labels) & set(contract.label_names):
        raise ValueError(f"new labels {new_labels} must be distinct and differ from the model's "
                         f"{contract.label_names}")
    if new_colors is None:
        used = {c.lower() for c in contract.label_colors}
        palette = [c for c in NEW_LABEL_COLORS if c not in used] or list(NEW_LABEL_COLORS)
        new_colors = tuple(palette[i % len(palette)] for i in range(len(new_labels)))
    if len(new_colors) != len(new_labels):
        raise ValueError("give one colour per new label")
    return replace(contract, label_names=contract.label_names + new_labels,
                   label_colors=contract.label_colors + tuple(new_colors))


# ---- patches and evaluation --------------------------------------------------------------------------

def _crop(arrays: Sequence[np.ndarray], start: Sequence[int], patch: Sequence[int], fills: Sequence) -> list[np.ndarray]:
    out = []
    for a, fill in zip(arrays, fills):
        o = np.full(tuple(patch), fill, dtype=a.dtype)
        src, dst = [], []
        for s, n, p in zip(start, a.shape, patch):
            lo, hi = max(s, 0), min(s + p, n)
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, hi - s))
        o[tuple(dst)] = a[tuple(src)]
        out.append(o)
    return out


def _train_patch(patch: Sequence[int], stride: int) -> tuple[int, ...]:
    """The contract's patch with z limited to ``TRAIN_Z_STRIDES`` strides."""
    p = tuple(int(s) for s in patch)
    return (min(p[0], TRAIN_Z_STRIDES * stride), *p[1:]) if len(p) == 3 else p


def _dice(net: nn.Module, examples: Sequence[tuple[PreparedExample, np.ndarray]], contract: InputContract,
          patch: tuple[int, ...], stride: int, device: torch.device, names: Sequence[str]) -> dict[str, float]:
    """Hard Dice on the held-back voxels (pooled over examples); prediction as the engine does it
    (sliding window, Gaussian blending, far-end zero padding) over the z-range around the held slices."""
    net.eval()
    preds, targets = [], []
    half = patch[0] // 2
    with torch.inference_mode():
        for ex, held in examples:
            zs = np.flatnonzero(held.any(axis=(1, 2)))
            if zs.size == 0:
                continue
            z0, z1 = max(0, int(zs.min()) - half), min(ex.image.shape[0], int(zs.max()) + half + 1)
            sub = ex.image[z0:z1]
            tile = tile_for(sub.shape, patch, stride)

            def predict(batch: torch.Tensor) -> torch.Tensor:
                return torch.softmax(net(batch.to(device)).float(), dim=1).cpu()

            probs = sliding_window(torch.from_numpy(np.ascontiguousarray(sub))[None], predict, lambda: 2, tile,
                                   0.5, contract.num_classes)
            pred = probs.argmax(0).numpy()
            m = held[z0:z1]
            preds.append(pred[m])
            targets.append(ex.labels[z0:z1][m])
    pred, target = np.concatenate(preds), np.concatenate(targets)
    per = dice_per_class(pred, target, contract.num_classes)
    out = {name: float(v) for name, v in zip(names[1:], per)}
    out["mean"] = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
    return out


def _score(d: dict[str, float]) -> float:
    v = d["mean"]
    return -1.0 if np.isnan(v) else v


# ---- fine-tuning ---------------------------------------------------------------------------------

def unshown_classes(prepared: Sequence[PreparedExample], masks: Sequence[np.ndarray], num_classes: int) -> list[int]:
    """Foreground classes (< ``num_classes``) that no voxel under ``masks`` is labelled with."""
    shown: set[int] = set()
    for p, m in zip(prepared, masks):
        shown.update(int(v) for v in np.unique(p.labels[m]))
    return [c for c in range(1, num_classes) if c not in shown]


def anchor_loss(logits: torch.Tensor, base_logits: torch.Tensor, classes: Sequence[int],
                where: torch.Tensor) -> torch.Tensor:
    """Mean over ``where`` voxels of KL(base || model) on the distribution over ``classes`` plus one class for
    everything else (merged, so the other classes, e.g. those being corrected, stay free). Both logits
    (B, C, *spatial); the base may have fewer classes than the model (a widened head) as long as it has
    every one of ``classes``."""
    idx = list(classes)

    def merged(z: torch.Tensor) -> torch.Tensor:
        prob = torch.softmax(z.float(), dim=1)
        kept = prob[:, idx]
        return torch.cat([kept, (1.0 - kept.sum(1, keepdim=True)).clamp_min(0.0)], dim=1).clamp_min(1e-6)

    p_base, p_model = merged(base_logits), merged(logits)
    kl = (p_base * (p_base.log() - p_model.log())).sum(1)
    w = where.to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp_min(1.0)


@reusing_large_allocations_on_cpu
def finetune(model: str | ModelSpec, examples: Sequence[CorrectionExample], *, budget_s: float = 60.0,
             max_steps: int | None = None, mode: Literal["decoder", "full"] = "decoder", device: str = "auto",
             holdout_fraction: float = 0.2, seed: int = 0, out_dir: str | Path | None = None, name: str | None = None,
             progress: Callable[[float, str], None] | None = None, cancel: Cancel = None,
             patch_size: Sequence[int] | None = None, batch_size: int = 2, lr: float | None = None,
             weight_decay: float = 1e-4, eval_every: int = 10, patience: int = 3,
             augment: AugmentConfig = INTENSITY_ONLY, new_labels: Sequence[str] = (),
             new_label_colors: Sequence[str] | None = None, anchor_weight: float = 1.0) -> FinetuneResult:
    """Fine-tune ``model`` (registry name or spec; its shipped weights when it has them) on ``examples``.

    Trains on patches (``patch_size``, default the contract's with z limited to :data:`TRAIN_Z_STRIDES` times the
    network's stride, never larger than the volume rounded up to the stride) centred on the supervised axial slices that are not held back; the loss is CE + soft Dice
    over supervised voxels only. A CT contract with ``body_threshold_hu`` has each example cut to its body's box
    first (as the engine segments it and the base was trained), for training and the held-back Dice. Stops at
    ``budget_s`` seconds, ``max_steps`` steps, when ``cancel`` says so, or after ``patience`` evaluations (every ``eval_every`` steps) without a better held-back Dice (not counted
    while a new class is still never predicted on the held-back slices); the best
    state is kept. With ``out_dir`` (a model store folder, see :mod:`.model_store`): writes ``<name>.safetensors``
    and ``<name>.json`` (model card) there, owner-only.

    ``new_labels`` adds classes the base never saw (few-shot new structure): the final classification layer
    (see :func:`widen_head`) gets one output channel per new label, numbered after the base's classes (the
    corrected label maps use ``num_classes``, ``num_classes + 1``, ... for them); existing classes' weights are
    copied, new channels start from background's with a lower bias. The result's contract has the extended
    ``label_names`` and ``label_colors`` (``new_label_colors``, or unused colours of :data:`NEW_LABEL_COLORS`),
    and the card records ``new_labels``.

    ``lr`` defaults to :data:`DEFAULT_LR` of the mode (1e-3 for 'decoder', 3e-4 for 'full').

    ``anchor_weight``: classes that no supervised voxel shows (e.g. the larynx when the user corrected parotid
    slices) are kept where they were: on unsupervised voxels of each patch, and of one extra patch per step taken
    anywhere in a scan, :func:`anchor_loss` (weight ``anchor_weight``; 0 turns it off) pulls their
    probabilities toward the base model's. Without it, the
    supervised voxels only ever say "not that organ here", and the shared decoder forgets it everywhere.
    """
    if mode not in ("decoder", "full"):
        raise ValueError(f"mode must be 'decoder' or 'full', got {mode!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if not examples:
        raise ValueError("no correction examples given")
    if lr is None:
        lr = DEFAULT_LR[mode]
    t_start = time.perf_counter()
    check = cancel_check(cancel)
    spec, net, base_sha = _base(model)
    contract = spec.contract
    teacher = copy.deepcopy(net).eval().requires_grad_(False) if anchor_weight > 0 else None  # the base, frozen
    head_name = None
    if new_labels:
        if isinstance(new_labels, str):
            raise TypeError("new_labels must be a sequence of names, not a string")
        base_classes = contract.num_classes
        contract = _extend_contract(contract, new_labels, new_label_colors)
        head_name = widen_head(net, base_classes, len(new_labels))
    stride = int(getattr(net, "stride", 1) or 1)
    prepared = [prepare_example(e, contract) for e in examples]
    if contract.body_threshold_hu is not None:  # a CT model segments the body's box only: train and score there too
        prepared = [_cropped_to_body(p, contract, stride) for p in prepared]

    # axial (working-grid z) slices with supervision; hold a fraction back
    slices = [(i, int(z)) for i, p in enumerate(prepared) for z in np.flatnonzero(p.supervised.any(axis=(1, 2)))]
    if not slices:
        raise ValueError("the edit logs mark no reviewed or edited voxel: nothing to learn from")
    rng = np.random.default_rng(seed)
    n_held = round(holdout_fraction * len(slices))
    if len(slices) >= 2 and holdout_fraction > 0:
        n_held = min(max(1, n_held), len(slices) - 1)
    else:
        n_held = 0
    order = rng.permutation(len(slices))
    held_set = {slices[k] for k in order[:n_held]}
    train_slices = [s for s in slices if s not in held_set]
    train_masks, held = [], []
    for i, p in enumerate(prepared):
        h = np.zeros(p.supervised.shape[0], bool)
        h[[z for j, z in held_set if j == i]] = True
        held.append((p, p.supervised & h[:, None, None]))
        train_masks.append(p.supervised & ~h[:, None, None])
    anchored = unshown_classes(prepared, train_masks, spec.contract.num_classes) if teacher is not None else []
    if not anchored:
        teacher = None
    fingerprint = _fingerprint([PreparedExample(p.image, p.labels, m) for p, m in zip(prepared, train_masks)])
    base_patch = tuple(int(s) for s in (patch_size or _train_patch(contract.patch_size, stride)))
    if len(base_patch) != 3 or any(s % stride for s in base_patch):
        raise ValueError(f"patch size {base_patch} must have 3 axes divisible by the network's stride {stride}")
    eval_set = [(p, m) for p, m in held if m.any()]
    eval_patch = tuple(int(s) for s in contract.patch_size)  # evaluation tiles as inference uses them

    dev = choose_device(device)
    torch.manual_seed(seed)
    net = net.to(dev)
    teacher = teacher.to(dev) if teacher is not None else None
    names = contract.label_names
    report = progress or (lambda f, s: None)
    report(0.0, "evaluating the base model")
    dice_before = _dice(net, eval_set, contract, eval_patch, stride, dev, names) if eval_set else {}
    trainable = _set_trainable(net, mode)
    params = [p for p in net.parameters() if p.requires_grad]
    if new_labels:  # the widened head learns a class from scratch: it gets NEW_CLASS_LR_FACTOR x the rate
        head_params = {id(p) for p in net.get_submodule(head_name).parameters()}
        groups = [{"params": [p for p in params if id(p) not in head_params]},
                  {"params": [p for p in params if id(p) in head_params], "lr": lr * NEW_CLASS_LR_FACTOR}]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best_state = copy.deepcopy(net.state_dict())
    best_score, best_step, dice_best = (_score(dice_before) if dice_before else -1.0), 0, dice_before
    history: list[dict] = []
    step, bad_evals, reason = 0, 0, "max_steps"
    fg = [np.argwhere(m) for m in train_masks]  # supervised voxels, for patch centres in y, x
    while True:
        elapsed = time.perf_counter() - t_start
        if not train_slices:
            reason = "no_trainable_slices"
            break
        if check():
            reason = "cancelled"
            break
        if max_steps is not None and step >= max_steps:
            reason = "max_steps"
            break
        if elapsed >= budget_s:
            reason = "budget"
            break
        net.train()
        xs, ys, igs = [], [], []
        for _ in range(batch_size):
            i, z = train_slices[int(rng.integers(len(train_slices)))]
            p = prepared[i]
            patch = tile_for(p.image.shape, base_patch, stride)
            in_slice = fg[i][fg[i][:, 0] == z]
            centre = in_slice[int(rng.integers(len(in_slice)))]
            start = [int(c) - s // 2 + (int(rng.integers(-s // 4, s // 4 + 1)) if a else 0)
                     for a, (c, s) in enumerate(zip(centre, patch))]
            start = [min(max(s, min(0, n - q)), max(0, n - q)) for s, n, q in zip(start, p.image.shape, patch)]
            im, lb, ig = _crop([p.image, p.labels, ~train_masks[i]], start, patch, (0.0, 0, True))
            xs.append(im), ys.append(lb), igs.append(ig)
        if teacher is not None:  # one replay patch from anywhere in the last sample's scan (same patch size):
            # the anchored classes far from the edits
            start = [int(rng.integers(0, max(1, n - q + 1))) for n, q in zip(p.image.shape, patch)]
            im, lb = _crop([p.image, p.labels], start, patch, (0.0, 0))
            xs.append(im), ys.append(lb), igs.append(np.ones(patch, dtype=bool))  # unsupervised: anchor only
        if len({x.shape for x in xs}) > 1:  # examples of different sizes: one at a time
            xs, ys, igs = xs[:1], ys[:1], igs[:1]
        x = torch.from_numpy(np.stack(xs))[:, None].to(dev)
        y = torch.from_numpy(np.stack(ys)).to(dev)
        ig = torch.from_numpy(np.stack(igs)).to(dev)
        x, y, ig, _ = augment_batch(x, y, rng, augment, mask=ig, lr_label_pairs=contract.lr_label_pairs)
        logits = net(x)
        loss = dice_ce_loss(logits, y, ignore_mask=ig)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = loss + anchor_weight * anchor_loss(logits, target, anchored, ig)
        opt.zero_grad(set_to_none=True)
        if bool(torch.isfinite(loss)):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12.0)
            opt.step()
        step += 1
        entry: dict = {"step": step, "loss": float(loss.detach())}
        if eval_set and (step % eval_every == 0 or step == max_steps):
            d = _dice(net, eval_set, contract, eval_patch, stride, dev, names)
            entry["heldout_dice"] = d["mean"]
            learning_new = bool(new_labels) and all(not d.get(str(n), 0.0) for n in new_labels)
            if _score(d) > best_score:
                best_score, best_step, dice_best, bad_evals = _score(d), step, d, 0
                best_state = copy.deepcopy(net.state_dict())
            elif not learning_new:  # a new class that is not predicted yet: keep going (budget / max_steps)
                bad_evals += 1
        history.append(entry)
        frac = max(step / max_steps if max_steps else 0.0, (time.perf_counter() - t_start) / max(budget_s, 1e-9))
        report(min(frac, 1.0), f"step {step} loss {entry['loss']:.4f}")
        if bad_evals >= patience:
            reason = "early_stop"
            break
    if not eval_set or (new_labels and best_step == 0):
        # nothing held back, or a new class the held-back slices never showed yet (the base cannot predict it
        # at all): keep the last weights
        best_state, best_step = copy.deepcopy(net.state_dict()), step
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(True)
    net = net.cpu().eval()
    seconds = time.perf_counter() - t_start
    report(1.0, "done")

    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    new_name = name or f"{spec.name}-ft-{h.hexdigest()[:8]}"
    card = {
        "model_name": new_name, "finetuned": True, "base_model": spec.name, "base_weights_sha256": base_sha,
        "data_fingerprint": fingerprint,
        "data_fingerprint_method": "sha256 over the prepared training arrays (image float32, labels int64, "
                                   "supervised mask bool; held-back slices unsupervised), with dtype and shape",
        "examples": len(examples), "train_slices": len(train_slices), "heldout_slices": n_held,
        "mode": mode, "trainable_parameters": int(sum(net.get_parameter(n).numel() for n in trainable)),
        "anchored_classes": [contract.label_names[c] for c in anchored], "anchor_weight": anchor_weight,
        "steps": step, "best_step": best_step, "seconds": round(seconds, 2), "stop_reason": reason,
        "dice_before": dice_before, "dice_after": dice_best,
        "dice_method": "hard Dice on the held-back supervised voxels (pooled), sliding window as in inference",
        "training": {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                     "patch_size": list(base_patch), "loss": "cross-entropy + soft Dice over supervised voxels only",
                     "augmentation": "intensity only", "seed": seed, "device": str(dev), "torch": torch.__version__},
        "input_contract": {"patch_size": list(contract.patch_size), "target_spacing_zyx_mm": contract.target_spacing,
                           "orientation": contract.orientation, "normalization": contract.normalization},
        "labels": list(contract.label_names),
        "label_colors": list(contract.label_colors),
        "intended_use": INTENDED_USE,
    }
    if new_labels:
        card["new_labels"] = list(contract.label_names[-len(new_labels):])
        card["base_labels"] = list(spec.contract.label_names)
        card["head"] = {"layer": head_name, "init": "existing classes copied; new classes = background channel "
                        f"with bias - {NEW_CLASS_BIAS_OFFSET}"}
    result_weights = result_card = None
    if out_dir is not None:
        stored = save_finetuned(net, card, new_name, store=out_dir)
        card, result_weights, result_card = stored.card, stored.weights, stored.card_path
    frozen = copy.deepcopy(net)
    # trained on tiles capped to the volume (tile_for): inference must tile the same way
    new_spec = ModelSpec(name=new_name, factory=lambda: copy.deepcopy(frozen),
                         contract=replace(contract, pad_to_patch=False),
                         description=f"{spec.name} fine-tuned on {len(examples)} corrected scan(s) ({mode}, {step} steps)",
                         card=card)
    return FinetuneResult(model=net, spec=new_spec, base_name=spec.name, dice_before=dice_before,
                          dice_after=dice_best, steps=step, best_step=best_step, seconds=seconds, stop_reason=reason,
                          mode=mode, train_slices=len(train_slices), heldout_slices=n_held,
                          data_fingerprint=fingerprint, history=history, weights_path=result_weights,
                          card_path=result_card, card=card)


def register_finetuned(result: FinetuneResult) -> ModelSpec:
    """Add the fine-tuned spec to the registry (the engine and widget can then select it by name; reverting
    means selecting the base name again). Its factory returns a copy of the fine-tuned network."""
    return register(result.spec)


def unregister(name: str) -> None:
    """Remove a fine-tuned model from the registry (shipped models cannot be removed)."""
    spec = get_model_spec(name)
    if not spec.card.get("finetuned"):
        raise ValueError(f"{name!r} is not a fine-tuned model; only fine-tuned models can be unregistered")
    del REGISTRY[name]
