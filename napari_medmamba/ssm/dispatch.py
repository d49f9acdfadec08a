"""Choose a selective-scan backend per call, validate inputs, and run it.

Backends:
    reference  plain PyTorch loop over L (slow; the test oracle), any device
    torch      chunked PyTorch (``chunked.py``), any device; the fallback
    cpu        numba kernels (``cpu.py``), CPU tensors
    triton     our Triton kernels (``napari_medmamba.ssm.triton``), CUDA tensors
    mamba_ssm  the ``mamba_ssm`` package's CUDA kernels, CUDA tensors; only when asked for

``auto`` (the default) takes triton, else torch, for CUDA tensors and cpu, else torch, for
CPU tensors. The ``backend=`` argument, else the environment variable
``MEDMAMBA_SSM_BACKEND``, forces one; a forced backend that cannot run raises
``BackendUnavailableError`` saying what to install or which device it needs.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from .reference import selective_scan_ref

__all__ = ["BACKENDS", "ENV_VAR", "BackendUnavailableError", "available_backends", "resolve_backend",
           "selective_scan_fn", "validate_scan_inputs"]

BACKENDS = ("reference", "torch", "cpu", "triton", "mamba_ssm")
ENV_VAR = "MEDMAMBA_SSM_BACKEND"
_CUDA_ONLY = {"triton", "mamba_ssm"}
_CPU_ONLY = {"cpu"}


class BackendUnavailableError(RuntimeError):
    """A selective-scan backend was requested that cannot run here or on these tensors."""


def _triton_status() -> tuple[bool, str]:
    try:
        module = importlib.import_module("napari_medmamba.ssm.triton")
    except ImportError as err:
        return False, f"needs triton and a CUDA GPU: pip install 'napari-medmamba[gpu]' ({err})"
    if not module.is_available():
        return False, "needs triton and a CUDA GPU (napari_medmamba.ssm.triton.is_available() is False)"
    return True, ""


def _backend_status(name: str) -> tuple[bool, str]:
    """(usable here, why not)."""
    if name in ("reference", "torch"):
        return True, ""
    if name == "cpu":
        from . import cpu

        return (True, "") if cpu.is_available() else (False, "needs numba: pip install 'numba>=0.58'")
    if name == "triton":
        return _triton_status()
    if name == "mamba_ssm":
        from .mamba_ssm_backend import INSTALL_HINT, is_installed

        if not is_installed():
            return False, f"needs mamba-ssm: {INSTALL_HINT}"
        if not torch.cuda.is_available():
            return False, "needs a CUDA GPU (mamba-ssm has CUDA kernels only)"
        return True, ""
    raise ValueError(f"unknown selective-scan backend {name!r}; choose from auto, {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Backends that can run on this machine (for some device)."""
    return [name for name in BACKENDS if _backend_status(name)[0]]


def _requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"unknown selective-scan backend {name!r} ({source}); "
                         f"choose from auto, {', '.join(BACKENDS)}")
    return name


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend a call on ``device`` uses, given ``backend`` / ``MEDMAMBA_SSM_BACKEND``."""
    device = torch.device(device)
    name = _requested(backend)
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
        return preferred if _backend_status(preferred)[0] else "torch"
    if name in _CUDA_ONLY and device.type != "cuda":
        raise BackendUnavailableError(f"selective-scan backend {name!r} needs CUDA tensors, got {device} "
                                      f"tensors; use backend 'cpu' or 'torch' for them")
    if name in _CPU_ONLY and device.type != "cpu":
        raise BackendUnavailableError(f"selective-scan backend {name!r} needs CPU tensors, got {device} "
                                      f"tensors; use 'triton' or 'torch' for them")
    usable, why = _backend_status(name)
    if not usable:
        raise BackendUnavailableError(f"selective-scan backend {name!r} is unavailable: {why}")
    return name


def _implementation(name: str) -> Callable:
    if name == "reference":
        return selective_scan_ref
    if name == "torch":
        from .chunked import selective_scan_torch

        return selective_scan_torch
    if name == "cpu":
        from .cpu import selective_scan_cpu

        return selective_scan_cpu
    if name == "triton":
        return importlib.import_module("napari_medmamba.ssm.triton").selective_scan_triton
    from .mamba_ssm_backend import selective_scan_mamba_ssm

    return selective_scan_mamba_ssm


def _check_vector(name: str, t: torch.Tensor | None, dim: int) -> None:
    if t is not None and tuple(t.shape) != (dim,):
        raise ValueError(f"{name} must have shape (dim,) = ({dim},), got {tuple(t.shape)}")


def validate_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raise ValueError/TypeError with a clear message when shapes, dtypes or devices don't fit."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"{name} is complex; only real selective scans are supported")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"all inputs must be on one device: u is on {u.device}, {name} on {t.device}")
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, N) with dim={dim}, got shape {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L), got shape {tuple(t.shape)}")
        if t.shape[0] != batch or t.shape[-2] != n_state or t.shape[-1] != length:
            expected = f"({batch}, N={n_state}, L={length})" if t.dim() == 3 else f"({batch}, G, {n_state}, {length})"
            raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)}")
        if t.dim() == 4 and (t.shape[1] < 1 or dim % t.shape[1]):
            raise ValueError(f"{name} has {t.shape[1]} groups, which must divide dim={dim}")
    _check_vector("D", D, dim)
    _check_vector("delta_bias", delta_bias, dim)


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, *, backend: str | None = None,
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan (Mamba S6) with mamba_ssm's semantics, on the best backend for the tensors.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Returns ``out`` in ``u``'s dtype, and with ``return_last_state``
    also the final state (batch, dim, N). ``backend`` overrides ``MEDMAMBA_SSM_BACKEND``.
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(u.device, backend)
    return _implementation(name)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
