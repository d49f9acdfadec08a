"""Backend choice for the selective scan (placeholder until the fast paths land: reference only)."""

from __future__ import annotations

import torch

from .reference import selective_scan_ref


def available_backends() -> list[str]:
    return ["reference"]


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
