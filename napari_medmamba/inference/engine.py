"""``segment``: a scan and a model in, labels + probabilities + uncertainty on the scan's own grid out.

Pipeline: validate -> reorient to the model's orientation -> resample to its working spacing
-> normalise -> Gaussian-blended sliding window (tiles batched; 2D models slice by slice)
-> probabilities resampled back (linear) -> labels = argmax, uncertainty = normalised entropy
-> orientation undone -> optional clean-up. Outputs share the input's geometry exactly.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Union

import numpy as np
import torch
import torch.nn as nn

from ..io.volume import Geometry, Volume
from ..large_allocations import reuse_large_allocations
from ..models.mamba import float32_products
from ..models.registry import InputContract, ModelSpec, get_model_spec, mirrored_class_order
from .body_crop import body_box
from .errors import SegmentationCancelled, SegmentationInputError
from .planner import (ACTIVATION_BYTES_PER_VOXEL, CPU_BATCH_VOXELS, TilePredictor, choose_device, free_memory_bytes,
                      inference_threads, plan_batch_size)
from .postprocessing import Postprocess, apply_postprocess
from .preprocessing import normalize, plan_orientation, resample_linear, working_shape
from .sliding_window import sliding_window, tile_for, tile_with_slack
from .to_source import SourceGridResult, to_source_grid

__all__ = ["segment", "SegmentationResult", "resolve_model", "DEFAULT_OVERLAP", "FAST_SPACING_FACTOR", "STAGES"]

"""Where the registry's ``ModelSpec.weights`` files are shipped."""

Mode = Literal["accurate", "fast"]
ModelLike = Union[str, ModelSpec, tuple[nn.Module, InputContract], tuple[nn.Module, InputContract, str]]
Cancel = Union[Callable[[], bool], threading.Event, None]

DEFAULT_OVERLAP: dict[str, float] = {"accurate": 0.5, "fast": 0.25}
FAST_SPACING_FACTOR = 1.5
"""'fast' mode works on a grid this much coarser than the model's target spacing."""
STAGES: dict[str, tuple[float, float]] = {
    "preprocess": (0.0, 0.1),
    "inference": (0.1, 0.85),
    "resample": (0.85, 0.95),
    "postprocess": (0.95, 1.0),
}
"""Share of the 0..1 progress range each stage reports into."""


@dataclass
class SegmentationResult:
    """What :func:`segment` returns; every array is on the input scan's (z, y, x) grid."""

    labels: Volume
    """Label map (uint8, or uint16 beyond 255 classes) with the input's geometry."""
    probabilities: np.ndarray | None
    """(num_classes, z, y, x) float16 softmax probabilities (None when not requested)."""
    uncertainty: np.ndarray
    """(z, y, x) float16 normalised entropy of the probabilities: 0 certain, 1 uniform."""
    label_names: tuple[str, ...]
    label_colors: tuple[str, ...]
    model_name: str
    mode: str
    device: str
    """Device the tiles finally ran on ("cuda:0", "cpu", ...)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage, plus 'forward' (pure forward passes) and 'total'."""
    warnings: list[str] = field(default_factory=list)

    @property
    def geometry(self) -> Geometry:
        return self.labels.geometry


class _Progress:
    """Maps per-stage fractions onto one monotonic 0..1 range and forwards them."""

    def __init__(self, callback: Callable[[float, str], None] | None) -> None:
        self.callback = callback
        self.last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        lo, hi = STAGES[stage]
        value = max(self.last, min(1.0, lo + (hi - lo) * min(max(fraction, 0.0), 1.0)))
        self.last = value
        if self.callback is not None:
            self.callback(value, stage)


def cancel_check(cancel: Cancel) -> Callable[[], bool]:
    """A no-argument check for a cancel request given as None, a threading.Event or a callable."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be None, a threading.Event or a callable returning bool")


def resolve_spec(model: str | ModelSpec) -> ModelSpec:
    """The ModelSpec of a registry name or of a fine-tuned model in the user's model store (a spec as is);
    nothing is loaded. KeyError for an unknown name."""
    if isinstance(model, ModelSpec):
        return model
    try:
        return get_model_spec(model)
    except KeyError:  # a fine-tuned model saved in the user's model store?
        from ..training.model_store import list_finetuned, load_finetuned

        if not any(m.name == model for m in list_finetuned()):
            raise
        return load_finetuned(model)


def resolve_model(model: ModelLike) -> tuple[nn.Module, InputContract, str, list[str]]:
    """(network, contract, name, warnings) for a registry name (or the name of a fine-tuned model in the
    user's model store), a ModelSpec or (module, contract)."""
    if isinstance(model, tuple):
        net, contract, *name = model
        if not isinstance(net, nn.Module) or not isinstance(contract, InputContract) or len(name) > 1:
            raise TypeError("model tuples are (torch.nn.Module, InputContract) or (module, contract, name)")
        return net, contract, (name[0] if name else type(net).__name__), []
    from ..models import build_model, load_registered_model

    if not isinstance(model, (str, ModelSpec)):
        raise TypeError("model must be a registry name, a ModelSpec or (torch.nn.Module, InputContract)")
    spec = resolve_spec(model)
    if spec.weights:
        return load_registered_model(spec), spec.contract, spec.name, []  # sha256 checked; errors propagate
    if spec.card.get("finetuned"):  # fine-tuned in this session: the factory returns the trained network
        return spec.factory(), spec.contract, spec.name, []
    warning = f"model {spec.name!r} runs with random weights (it has no trained weights yet): the labels are meaningless"
    return build_model(spec.name), spec.contract, spec.name, [warning]


def _validated(volume: Volume | np.ndarray, contract: InputContract) -> Volume:
    """The scan as a Volume, or a SegmentationInputError saying what is wrong with it."""
    if isinstance(volume, np.ndarray):
        if volume.ndim == 2:
            raise SegmentationInputError(f"a 2D image of shape {volume.shape} was given; segmentation needs a 3D (z, y, x) volume")
        if volume.ndim == 4:
            raise SegmentationInputError(
                f"a 4D array of shape {volume.shape} was given; the model takes a single-channel (z, y, x) volume"
            )
        if volume.ndim != 3:
            raise SegmentationInputError(f"expected a 3D (z, y, x) volume, got an array of shape {volume.shape}")
        volume = Volume(volume, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume or a NumPy array, got {type(volume).__name__}")
    if contract.in_channels != 1:
        raise SegmentationInputError(
            f"the model expects {contract.in_channels} input channels but a volume has 1; multi-channel input is not supported"
        )
    array = volume.array
    if array.size == 0:
        raise SegmentationInputError(f"the volume is empty (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise SegmentationInputError(f"voxel type {array.dtype} cannot be segmented; expected integers or floats")
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise SegmentationInputError(f"the volume has {bad} NaN or infinite voxels; replace them before segmenting")
    if contract.spatial_dims == 3 and min(array.shape) < 2:
        raise SegmentationInputError(f"the volume of shape {array.shape} is a single 2D slice; this 3D model needs a volume")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise SegmentationInputError(f"every voxel of the volume has the value {lo}: there is nothing to segment")
    return volume


def _check_patch(net: nn.Module, contract: InputContract) -> None:
    stride = getattr(net, "stride", None)
    if stride is None:
        return
    strides = (stride,) * len(contract.patch_size) if isinstance(stride, int) else tuple(stride)
    if len(contract.patch_size) != contract.spatial_dims:
        raise SegmentationInputError(f"patch size {contract.patch_size} does not have {contract.spatial_dims} axes")
    bad = [p for p, s in zip(contract.patch_size, strides) if p % s]
    if bad:
        raise SegmentationInputError(f"patch size {contract.patch_size} is not divisible by the model's stride {stride}")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _cancellable(net: nn.Module, check: Callable[[], bool]) -> Iterator[None]:
    """Check ``check`` before every submodule's forward, so a long tile can be cancelled too."""

    def hook(_module: nn.Module, _inputs: object) -> None:
        if check():
            raise SegmentationCancelled("segmentation cancelled during inference")

    handles = [m.register_forward_pre_hook(hook) for m in net.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_fn(net: nn.Module, contract: InputContract, precision: str,
                mirror: bool) -> Callable[[torch.Tensor, torch.device], torch.Tensor]:
    """forward(batch, device): CPU (B, C, *patch) tiles -> CPU (B, classes, *patch) probabilities; with ``mirror``,
    averaged with the predictions on the tiles mirrored along each of ``contract.mirror_axes``."""

    def logits_of(x: torch.Tensor, device: torch.device) -> torch.Tensor:
        bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        exact = float32_products() if precision == "fp32" else contextlib.nullcontext()
        try:
            with exact, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return net(x)
        except (SegmentationCancelled, torch.cuda.OutOfMemoryError):
            raise
        except (RuntimeError, ValueError) as error:
            if "not enough memory" in str(error):  # the CPU allocator's out-of-memory RuntimeError
                raise MemoryError(f"out of memory on {device} running a batch of {x.shape[0]} tiles") from error
            raise SegmentationInputError(
                f"the model failed on input of shape {tuple(x.shape)} (patch {contract.patch_size}): {error}"
            ) from error

    axes = contract.mirror_axes if mirror and contract.spatial_dims == 3 else ()
    lr_order = mirrored_class_order(contract.lr_label_pairs, contract.num_classes)

    def forward(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = batch.to(device)
        if contract.spatial_dims == 2:
            x = x[:, :, 0]
        n = x.shape[0]
        views = 1 + len(axes)
        together = axes and device.type == "cpu" and n * views * int(np.prod(x.shape[2:])) <= CPU_BATCH_VOXELS
        if together:  # the tiles and their mirror images as one batch: 1.2x faster on 2 cores than one by one
            logits_all = logits_of(torch.cat([x] + [torch.flip(x, (2 + axis,)) for axis in axes]), device)
            logits, mirrored_logits = logits_all[:n], list(logits_all[n:].split(n))
        else:
            logits = logits_of(x, device)
        if contract.spatial_dims == 2:
            logits = logits[:, :, None]
        expected = (x.shape[0], contract.num_classes, *batch.shape[2:])
        if tuple(logits.shape) != expected:
            raise SegmentationInputError(
                f"the model returned shape {tuple(logits.shape)} for tiles {tuple(batch.shape)}; "
                f"the contract expects {expected} ({contract.num_classes} classes, same spatial size)"
            )
        probs = torch.softmax(logits.float(), dim=1)
        for i, axis in enumerate(axes):  # (z, y, x) axis -> tensor dim 2 + axis
            flipped = mirrored_logits[i] if together else logits_of(torch.flip(x, (2 + axis,)), device)
            mirrored = torch.flip(torch.softmax(flipped.float(), dim=1), (2 + axis,))
            if axis == 2 and contract.lr_label_pairs:  # a left-right mirror swaps right and left organs back
                mirrored = mirrored[:, lr_order]
            probs += mirrored
        if axes:
            probs /= 1 + len(axes)
        return probs.cpu()

    return forward


def _to_source(probs: np.ndarray, shape: tuple[int, int, int], scale: tuple[float, float, float],
               device: torch.device, keep: bool, cancel: Callable[[], None], progress: Callable[[float], None],
               warn: Callable[[str], None], flip_zyx: tuple[bool, bool, bool]) -> SourceGridResult:
    """:func:`to_source_grid` on ``device``; on CUDA out-of-memory, again on the CPU (with a warning)."""
    try:
        return to_source_grid(probs, shape, scale, device, keep, cancel, progress, flip_zyx)
    except torch.OutOfMemoryError:
        if device.type == "cpu":
            raise
        torch.cuda.empty_cache()
        warn("out of GPU memory while resampling back to the scan's grid; finished on the CPU")
        return to_source_grid(probs, shape, scale, torch.device("cpu"), keep, cancel, progress, flip_zyx)


def segment(
    volume: Volume | np.ndarray,
    model: ModelLike,
    device: str | torch.device = "auto",
    mode: Mode = "accurate",
    overlap: float | None = None,
    postprocess: Postprocess | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Cancel = None,
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    return_probabilities: bool = True,
    mirror: bool = False,
) -> SegmentationResult:
    """Segment ``volume`` with ``model``; every output lies on the volume's own grid.

    ``mode='fast'`` works at 1.5x coarser spacing with less window overlap (0.25 instead of
    0.5). ``precision='auto'`` uses bf16 autocast on CUDA; on the CPU it keeps float32 except for the Mamba
    layers' projections, which are bf16 products on CPUs that multiply bf16 natively (``models.mamba.
    piece_product_dtype``); ``'fp32'`` keeps every step float32. ``progress``
    gets monotonic (fraction, stage) calls ending at 1.0; ``cancel`` (a callable or a
    ``threading.Event``) is honoured between tiles and inside the network's forward pass,
    raising :class:`SegmentationCancelled`. Bad input raises :class:`SegmentationInputError`.
    ``mirror=True`` averages each tile's prediction with those of its mirror images along the contract's
    ``mirror_axes`` (test-time mirroring: each axis costs one more forward pass; models without
    ``mirror_axes`` are unaffected). A CT contract with ``body_threshold_hu`` has only the body's box
    segmented (:mod:`napari_medmamba.inference.body_crop`); the rest is background. ``postprocess`` cleans the
    label map (None: no clean-up); the clean-up measured to help a model, which the CLI and the napari widget
    apply by default, is ``recommended_postprocess(model)`` (:mod:`napari_medmamba.inference.postprocessing`).
    """
    t_start = time.perf_counter()
    if mode not in DEFAULT_OVERLAP:
        raise ValueError(f"mode must be 'accurate' or 'fast', got {mode!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    check = cancel_check(cancel)

    def raise_if_cancelled() -> None:
        if check():
            raise SegmentationCancelled("segmentation cancelled")

    report = _Progress(progress)
    timings: dict[str, float] = {}
    net, contract, name, warnings = resolve_model(model)
    volume = _validated(volume, contract)
    _check_patch(net, contract)
    if contract.modality != "any" and volume.modality not in (None, contract.modality):
        warnings.append(f"the model was trained on {contract.modality} but the scan is {volume.modality}")
    dev = choose_device(device)
    overlap = DEFAULT_OVERLAP[mode] if overlap is None else float(overlap)

    with _torch_threads(inference_threads()):
        # --- preprocess: orientation, working spacing, normalisation
        t0 = time.perf_counter()
        report("preprocess", 0.0)
        orientation = plan_orientation(volume.geometry, volume.shape, contract.orientation)
        grid = orientation.geometry
        oriented = orientation.apply(volume.array)
        target = np.asarray(contract.target_spacing or grid.spacing_zyx, dtype=float)
        if mode == "fast":
            target = target * FAST_SPACING_FACTOR
        same_grid = bool(np.allclose(target, grid.spacing_zyx, rtol=1e-4, atol=0))
        if same_grid:
            work_geometry, image = grid, oriented
        else:
            work_geometry = Geometry(tuple(target[::-1]), grid.origin, grid.direction)  # type: ignore[arg-type]
            shape = working_shape(orientation.shape, grid.spacing_zyx, tuple(target))
            image = resample_linear(oriented, grid, work_geometry, shape, cancel=check)
        report("preprocess", 0.7)
        raise_if_cancelled()
        stride = int(getattr(net, "stride", 1) or 1)
        working = image.shape
        box = (body_box(image, contract.body_threshold_hu, work_geometry.spacing_zyx, multiple=stride)
               if contract.body_threshold_hu is not None and contract.spatial_dims == 3 else None)
        if box is not None:
            image = image[box]
        image = normalize(image, contract)
        report("preprocess", 1.0)
        timings["preprocess"] = time.perf_counter() - t0

        # --- inference: sliding window (2D models: one slice per tile)
        t0 = time.perf_counter()
        if contract.spatial_dims == 2:
            image = np.moveaxis(image, contract.slice_axis, 0)
        spatial = image.shape[-len(contract.patch_size):]
        grown = tile_with_slack(spatial, contract.patch_size, stride, contract.max_tile_growth)
        if box is not None:  # tiles no larger than the body's box (the model was trained on such tiles)
            tile = tile_for(spatial, grown, stride)
        else:
            tile = grown if contract.pad_to_patch else tile_for(spatial, contract.patch_size, stride)
        patch = (1, *tile) if contract.spatial_dims == 2 else tile
        bytes_per_voxel = getattr(net, "activation_bytes_per_voxel", ACTIVATION_BYTES_PER_VOXEL)
        batch = plan_batch_size(free_memory_bytes(dev), int(np.prod(patch)), dev.type, bytes_per_voxel)
        was_training = net.training
        home = next(net.parameters(), torch.empty(0)).device
        predictor = TilePredictor(_forward_fn(net, contract, precision, mirror), lambda d: net.to(d), dev, batch, warnings.append)
        try:
            net.eval()
            net.to(dev)
            heap = reuse_large_allocations() if dev.type == "cpu" else contextlib.nullcontext()
            with _cancellable(net, check), torch.inference_mode(), heap:
                probs = sliding_window(
                    torch.from_numpy(np.ascontiguousarray(image))[None],
                    predictor,
                    lambda: predictor.batch_size,
                    patch,  # type: ignore[arg-type]
                    overlap,
                    contract.num_classes,
                    progress=lambda f: report("inference", f),
                    cancel=check,
                ).numpy()
        finally:
            net.train(was_training)
            net.to(home)
        del image
        if box is not None:  # outside the body: background, certain
            full = np.zeros((contract.num_classes, *working), dtype=probs.dtype)
            full[0] = 1.0
            full[(slice(None), *box)] = probs
            probs = full
        if contract.spatial_dims == 2:
            probs = np.moveaxis(probs, 1, 1 + contract.slice_axis)
        timings["inference"] = time.perf_counter() - t0
        timings["forward"] = predictor.forward_seconds

        # --- back to the scan's grid: probabilities linear, labels = argmax (on the inference device)
        t0 = time.perf_counter()
        scale = tuple(float(s) / float(w) for s, w in zip(grid.spacing_zyx, work_geometry.spacing_zyx))
        flips_only = orientation.perm == (0, 1, 2)  # then the flips are undone inside the interpolation
        flip_zyx = tuple(orientation.flip[::-1]) if flips_only else (False, False, False)
        back = _to_source(probs, orientation.shape, scale, predictor.device, return_probabilities, raise_if_cancelled,
                          lambda f: report("resample", 0.9 * f), warnings.append, flip_zyx)
        del probs
        undo = (lambda a: a) if flips_only else (lambda a: np.ascontiguousarray(orientation.undo(a)))
        labels, uncertainty = undo(back.labels), undo(back.uncertainty)
        source_probs = undo(back.probabilities) if return_probabilities else None
        del back
        report("resample", 1.0)
        timings["resample"] = time.perf_counter() - t0

        # --- optional clean-up
        t0 = time.perf_counter()
        raise_if_cancelled()
        if postprocess is not None:
            labels = apply_postprocess(labels, postprocess, volume.geometry.voxel_volume_ml, raise_if_cancelled)
        report("postprocess", 1.0)
        timings["postprocess"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return SegmentationResult(
        labels=volume.with_array(labels),
        probabilities=source_probs,
        uncertainty=uncertainty,
        label_names=contract.label_names,
        label_colors=contract.label_colors,
        model_name=name,
        mode=mode,
        device=str(predictor.device),
        timings=timings,
        warnings=warnings,
    )
