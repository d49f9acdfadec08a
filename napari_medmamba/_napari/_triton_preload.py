"""Import triton safely inside a napari process.

triton's native library bundles its own LLVM. Under Mesa's OpenGL drivers (llvmpipe, as under Xvfb or in many
VMs, and AMD's radeonsi), napari's canvas has already loaded Mesa's LLVM into the process; importing triton
after that resolves triton's LLVM symbols to Mesa's copy and crashes the process (segmentation fault). torch
imports triton on its own, e.g. when an optimiser is built for fine-tuning, so one click could kill the
viewer. Importing triton once here, with ``RTLD_DEEPBIND`` when an LLVM is already loaded, makes its library
use its own symbols; later imports find it in ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["preload_triton"]


def _llvm_loaded() -> bool:
    """Whether a shared LLVM library (e.g. Mesa's) is mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def preload_triton() -> bool:
    """Import triton if it is installed and not imported yet; True when this call imported it."""
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return False
    deepbind = getattr(os, "RTLD_DEEPBIND", 0) if _llvm_loaded() else 0
    flags = sys.getdlopenflags() if deepbind else 0
    try:
        if deepbind:
            sys.setdlopenflags(flags | deepbind)
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton must not stop the plugin: torch then runs without it
        return False
    finally:
        if deepbind:
            sys.setdlopenflags(flags)
    return True
