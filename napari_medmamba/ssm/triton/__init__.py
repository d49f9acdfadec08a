"""Selective scan in Triton (forward and backward): a single-launch sequential path for
short sequences (``short.py``, L <= ``short.SHORT_L_MAX``) and a chunked path, parallel over
the sequence too, for longer ones (routing: ``autograd.selective_scan_triton``).

Importing this package never imports triton; ``is_available()`` says whether the kernels can
run (triton importable, and a CUDA device or ``TRITON_INTERPRET=1``). Design notes and
measured numbers: docs/triton_scan.md.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

__all__ = ["is_available", "selective_scan_triton"]

_MISSING = ("the Triton selective scan needs the 'triton' package: pip install triton "
            "(or pip install 'napari-medmamba[gpu]')")


@lru_cache(maxsize=1)
def _triton_installed() -> bool:
    """Whether triton can be imported; asked once per process (``find_spec`` costs ~30 us, and this
    runs on every scan call)."""
    return importlib.util.find_spec("triton") is not None


def is_available() -> bool:
    """True when triton is installed and there is a CUDA GPU (or the Triton interpreter is on)."""
    if not _triton_installed():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken torch install
        return False


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, **kwargs):
    """mamba_ssm ``selective_scan_fn`` semantics on CUDA tensors via Triton; see ``autograd``."""
    if not _triton_installed():
        raise ImportError(_MISSING)
    from .autograd import selective_scan_triton as _impl

    return _impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **kwargs)
