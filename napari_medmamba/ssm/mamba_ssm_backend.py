"""The reference CUDA kernels of the ``mamba_ssm`` package, as an opt-in backend (CUDA only)."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["is_installed", "selective_scan_mamba_ssm", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'napari-medmamba[mamba]' (mamba-ssm, needs a CUDA toolchain)"


def is_installed() -> bool:
    """True when ``mamba_ssm`` can be found (it is not imported here)."""
    return importlib.util.find_spec("mamba_ssm") is not None


def selective_scan_mamba_ssm(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False):
    """Call ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (imported on first use)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as err:
        raise ImportError(f"the 'mamba_ssm' backend needs mamba-ssm: {INSTALL_HINT} ({err})") from err
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
