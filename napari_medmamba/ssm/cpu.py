"""Fast CPU selective scan: numba kernels (parallel over batch x channel slices) + PyTorch autograd.

Forward: one sequential pass per channel with an fp32 state and a vectorised polynomial exp
(float64 inputs compute in float64). Backward: recomputes each chunk's states from
checkpoints saved every ``CHUNK`` steps, then runs the adjoint recurrence backwards.
numba is imported lazily; without it ``selective_scan_cpu`` raises ``ImportError`` saying
what to install.
"""

from __future__ import annotations

from typing import Any

import torch

from ._scan_autograd import run_scan

__all__ = ["selective_scan_cpu", "is_available", "NumbaScanCore"]

_INSTALL_HINT = "the 'cpu' selective-scan backend needs numba: pip install 'numba>=0.58'"


def is_available() -> bool:
    """True when numba (and so the compiled CPU kernels) can be imported."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


def _kernels():
    try:
        from . import _cpu_numba
    except ImportError as err:  # numba or llvmlite missing / broken
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return _cpu_numba


def _slices(batch: int, groups: int, per_group: int, threads: int) -> int:
    """Channel slices per (batch, group) so that every thread gets at least one work item."""
    return max(1, min(per_group, -(-threads // (batch * groups))))


class NumbaScanCore:
    """``ScanCore`` running the numba kernels on CPU tensors."""

    def __init__(self, chunk: int | None = None):
        self.kernels = _kernels()
        self.chunk = chunk or self.kernels.CHUNK

    def _slices_for(self, u: torch.Tensor, Bt: torch.Tensor) -> int:
        batch, dim, _ = u.shape
        groups = Bt.shape[1]
        return _slices(batch, groups, dim // groups, self.kernels.num_threads())

    def forward(self, u, dt, A, Bt, Ct, need_backward: bool):
        slices = self._slices_for(u, Bt)
        y, checkpoints, last = self.kernels.scan_forward(
            u.numpy(), dt.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), slices, self.chunk, need_backward)
        return torch.from_numpy(y), torch.from_numpy(last), checkpoints

    def backward(self, u, dt, A, Bt, Ct, saved: Any, dy, d_last):
        if d_last is None:
            d_last = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
        slices = self._slices_for(u, Bt)
        grads = self.kernels.scan_backward(
            u.numpy(), dt.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), dy.numpy(), saved,
            d_last.numpy(), slices, self.chunk)
        return tuple(torch.from_numpy(g) for g in grads)


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False):
    """Selective scan on CPU tensors with numba kernels (same contract as ``selective_scan_ref``)."""
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu needs CPU tensors, got {u.device}")
    return run_scan(NumbaScanCore(), u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
