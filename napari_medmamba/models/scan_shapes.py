"""Shapes of the selective-scan calls the models make, and their FLOPs, without running any scan.

The networks run on the ``meta`` device (no memory, no compute) while :func:`mamba.scan_override`
records every call as (B, D, L, N): batch, channels, sequence length, state size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .mamba import scan_override
from .registry import REGISTRY, get_model_spec

__all__ = ["scan_calls", "model_scan_shapes", "lightm_unet_3d_scan_shapes", "scan_flops", "model_flops",
           "OFFICIAL_LIGHTM_PATCH"]

ScanShape = tuple[int, int, int, int]
OFFICIAL_LIGHTM_PATCH = (128, 128, 128)
"""The default 3D patch of the official LightM-UNet experiments."""


def _default_input(name: str, batch: int, patch: Sequence[int] | None = None) -> tuple[int, ...]:
    c = get_model_spec(name).contract
    return (batch, c.in_channels, *(patch or c.patch_size))


def scan_calls(name: str, input_shape: Sequence[int] | None = None, batch: int = 1,
               count_flops: bool = False) -> tuple[list[ScanShape], int]:
    """(B, D, L, N) of each scan call of registered model ``name`` on ``input_shape`` (default: its
    contract's patch), and the conv/matmul FLOPs outside the scan (0 unless ``count_flops``)."""
    shapes: list[ScanShape] = []

    def record(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        shapes.append((u.shape[0], u.shape[1], u.shape[2], A.shape[1]))
        return torch.empty_like(u)

    with torch.device("meta"):
        model: nn.Module = get_model_spec(name).factory()
    model.eval()
    x = torch.empty(tuple(input_shape) if input_shape else _default_input(name, batch), device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), scan_override(record):
        if count_flops:
            with counter:
                model(x)
        else:
            model(x)
    return shapes, (counter.get_total_flops() if count_flops else 0)


def model_scan_shapes(batch: int = 1) -> dict[str, list[ScanShape]]:
    """For every registered model: (B, D, L, N) of each scan call at its default input size."""
    return {name: scan_calls(name, batch=batch)[0] for name in REGISTRY}


def lightm_unet_3d_scan_shapes(patch: Sequence[int] = OFFICIAL_LIGHTM_PATCH, batch: int = 1) -> list[ScanShape]:
    """The scan calls of ``lightm_unet_3d`` at the official 128^3 patch (or ``patch``)."""
    return scan_calls("lightm_unet_3d", _default_input("lightm_unet_3d", batch, patch))[0]


def scan_flops(shapes: Sequence[ScanShape], gated: bool = True) -> int:
    """FLOPs of scans of these shapes: per state element exp(delta*A), delta*B*u, the state update and
    C.h (9 B D L N), plus the D skip (2 B D L) and, if ``gated``, the SiLU(z) gate (~5 B D L)."""
    return sum(9 * b * d * l * n + (7 if gated else 2) * b * d * l for b, d, l, n in shapes)


def model_flops(name: str, input_shape: Sequence[int] | None = None, batch: int = 1) -> dict[str, int]:
    """Forward FLOPs of a registered model: convolutions/matmuls (FlopCounterMode) + scans (analytic).
    Norms, activations and other elementwise ops are not counted."""
    shapes, dense = scan_calls(name, input_shape, batch, count_flops=True)
    gated = not name.startswith("mhs_vm")  # MHS-VM scans without z; Mamba blocks gate with SiLU(z)
    scans = scan_flops(shapes, gated=gated)
    return {"dense": int(dense), "scan": int(scans), "total": int(dense + scans)}
