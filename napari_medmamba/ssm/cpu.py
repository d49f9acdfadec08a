"""Fast CPU selective scan: numba kernels (parallel over batch x channel slices) + PyTorch autograd.

Forward: one sequential pass per channel with an fp32 state and a vectorised polynomial exp
(float64 inputs compute in float64); bias, softplus, D and the SiLU(z) gate are fused in. Backward: recomputes each chunk's states from
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

LARGE_ROW_BYTES = 4 << 20
"""Sequences whose rows (L x itemsize) are at least this long make the backward take at most
``BACKWARD_MAX_CHANNELS`` channels per work item. Walking 32 channels of 4 MB rows chunk by chunk ran the
backward 2.9x slower (5.8 s against 2.0 s at (1,64,1048576,16), the CT model's first stage, on a 2-core
EPYC); up to 2 MB rows (L = 524 288) the usual split into one item per thread was as fast or faster."""
BACKWARD_MAX_CHANNELS = 16


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
        if not 1 <= self.chunk <= self.kernels.MAX_CHUNK:
            raise ValueError(f"chunk must be between 1 and {self.kernels.MAX_CHUNK}, got {self.chunk}")

    def _slices_for(self, u: torch.Tensor, Bt: torch.Tensor) -> int:
        batch, dim, _ = u.shape
        groups = Bt.shape[1]
        return _slices(batch, groups, dim // groups, self.kernels.num_threads())

    def forward(self, u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, need_backward: bool):
        out, last, saved = self.kernels.scan_forward(
            u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), _numpy(D), _numpy(z),
            _numpy(delta_bias), softplus, self._slices_for(u, Bt), self.chunk, need_backward)
        return torch.from_numpy(out), torch.from_numpy(last), saved

    def _backward_slices(self, u: torch.Tensor, Bt: torch.Tensor) -> int:
        slices = self._slices_for(u, Bt)
        if u.shape[-1] * u.element_size() >= LARGE_ROW_BYTES:
            per_group = u.shape[1] // Bt.shape[1]
            slices = max(slices, -(-per_group // BACKWARD_MAX_CHANNELS))
        return slices

    def backward(self, u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, saved: Any, dout, d_last):
        grads = self.kernels.scan_backward(
            u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), _numpy(D), _numpy(z),
            _numpy(delta_bias), softplus, self._backward_slices(u, Bt), self.chunk, saved, dout.numpy(),
            _numpy(d_last))
        return tuple(None if g is None else torch.from_numpy(g) for g in grads)


def _numpy(t: torch.Tensor | None):
    return None if t is None else t.numpy()


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False):
    """Selective scan on CPU tensors with numba kernels (same contract as ``selective_scan_ref``)."""
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu needs CPU tensors, got {u.device}")
    return run_scan(NumbaScanCore(), u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
