"""Class probabilities from the working grid back onto the scan's grid, with labels and uncertainty.

The working grid shares the (reoriented) scan's origin and direction and differs only in spacing,
so going back is a per-axis scale: output voxel ``i`` sits at working index ``i * s_scan / s_work``.
Trilinear interpolation is then three 1-D linear interpolations (gather + lerp), done in torch on
the inference device (a GPU when there is one) in z slabs, with the argmax and the normalised
entropy computed on the same slab. Each axis is clamped to the working grid: beyond its first/last
voxel centre an axis takes the edge value while the other axes are still interpolated. (SimpleITK's
linear interpolator with a nearest-neighbour extrapolator, used before, takes the nearest voxel
outright there; inside the grid the two agree to float rounding.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["AxisPlan", "SourceGridResult", "axis_plan", "to_source_grid"]

SLAB_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}
"""Probabilities (classes x voxels) interpolated per slab: 8 MB of float32 on a CPU (cache-sized: 2x faster
than 128 MB slabs on 2 cores), 128 MB on a GPU (few launches)."""


@dataclass(frozen=True)
class AxisPlan:
    """For each output index along one axis: the two working-grid neighbours and the weight of the upper one."""

    lower: torch.Tensor
    upper: torch.Tensor
    weight: torch.Tensor
    identity: bool = False
    """True when output index i is working index i (same grid along this axis): nothing to interpolate."""

    def to(self, device: torch.device) -> AxisPlan:
        return AxisPlan(self.lower.to(device), self.upper.to(device), self.weight.to(device), self.identity)


def axis_plan(n_out: int, n_in: int, scale: float, flip: bool = False) -> AxisPlan:
    """Linear-interpolation plan for output index ``i`` at working coordinate ``i * scale``, clamped to the grid;
    ``flip`` reverses the output order (output ``i`` takes what ``n_out - 1 - i`` would)."""
    x = (torch.arange(n_out, dtype=torch.float64) * float(scale)).clamp_(0.0, float(n_in - 1))
    lower = x.floor().long()
    upper = (lower + 1).clamp_(max=n_in - 1)
    weight = (x - lower).float()
    if flip:
        return AxisPlan(lower.flip(0), upper.flip(0), weight.flip(0))
    return AxisPlan(lower, upper, weight, identity=n_out == n_in and float(scale) == 1.0)


def _interpolate(t: torch.Tensor, dim: int, plan: AxisPlan) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``dim`` at the positions of ``plan``."""
    if plan.identity:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    low = t.index_select(dim, plan.lower)
    return low.lerp_(t.index_select(dim, plan.upper), plan.weight.view(shape))


@dataclass
class SourceGridResult:
    labels: np.ndarray
    """(z, y, x) argmax labels, uint8 (uint16 beyond 256 classes)."""
    uncertainty: np.ndarray
    """(z, y, x) float16 normalised entropy in [0, 1]."""
    probabilities: np.ndarray | None
    """(classes, z, y, x) float16, or None when not asked for."""


def to_source_grid(
    probs: np.ndarray,
    out_shape: tuple[int, int, int],
    scale_zyx: tuple[float, float, float],
    device: torch.device | str = "cpu",
    keep_probabilities: bool = True,
    cancel: Callable[[], None] = lambda: None,
    progress: Callable[[float], None] = lambda f: None,
    flip_zyx: tuple[bool, bool, bool] = (False, False, False),
) -> SourceGridResult:
    """Interpolate (classes, z, y, x) working-grid ``probs`` to ``out_shape``; labels, entropy and probabilities.

    ``scale_zyx[k]`` is the scan's spacing over the working spacing along axis k (1 = same grid).
    Runs on ``device`` slab by slab; ``cancel`` (raises to stop) is called before each slab. ``flip_zyx``
    reverses output axes as part of the interpolation (an orientation undone for free: no flipped copies).
    """
    device = torch.device(device)
    classes = probs.shape[0]
    src = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)).to(device)
    plans = [axis_plan(n_out, n_in, s, f) for n_out, n_in, s, f in zip(out_shape, probs.shape[1:], scale_zyx, flip_zyx)]
    plan_y, plan_x = plans[1].to(device), plans[2].to(device)
    labels = np.empty(out_shape, dtype=np.uint8 if classes <= 256 else np.uint16)
    label_dtype = torch.uint8 if classes <= 256 else torch.int32  # torch has no uint16 arithmetic everywhere
    entropy = np.empty(out_shape, dtype=np.float16)
    out = np.empty((classes, *out_shape), dtype=np.float16) if keep_probabilities else None
    # torch views of the outputs: slabs are written in place (one copy from the device, dtype cast included)
    labels_t = torch.from_numpy(labels.view(np.int16) if labels.dtype == np.uint16 else labels)
    entropy_t = torch.from_numpy(entropy)
    out_t = torch.from_numpy(out) if out is not None else None
    norm = 1.0 / math.log(classes) if classes > 1 else 0.0
    nz = out_shape[0]
    budget = SLAB_ELEMENTS.get(device.type, SLAB_ELEMENTS["cpu"])
    slab = max(1, budget // max(1, classes * out_shape[1] * out_shape[2]))
    for z0 in range(0, nz, slab):
        cancel()
        z1 = min(nz, z0 + slab)
        lower, upper = plans[0].lower[z0:z1], plans[0].upper[z0:z1]
        lo, hi = (z0, z1) if plans[0].identity else (int(lower.min()), int(upper.max()) + 1)
        pz = AxisPlan(lower - lo, upper - lo, plans[0].weight[z0:z1], plans[0].identity).to(device)
        p = _interpolate(_interpolate(_interpolate(src[:, lo:hi], 1, pz), 2, plan_y), 3, plan_x)
        # first maximum on ties; max(0) is much faster than argmax(0) on a CPU; narrowed on the device so that
        # 1 byte per voxel (not 8) crosses to the host
        labels_t[z0:z1].copy_(p.max(0).indices.to(label_dtype))
        h = (p * p.clamp_min(1e-12).log()).sum(0).mul_(-norm).clamp_(0.0, 1.0)
        entropy_t[z0:z1].copy_(h)
        if out_t is not None:
            for c in range(classes):  # contiguous destination blocks: one device-to-host copy each, no temporary
                out_t[c, z0:z1].copy_(p[c])
        progress(z1 / nz)
    return SourceGridResult(labels, entropy, out)
