"""Launch our compiled Triton kernels without Triton's per-call argument specialisation.

``kernel[grid](*args, **meta)`` costs 40-70 us of host time per launch on an H100 machine
(``JITFunction.run``: binding and specialising every argument, hashing the specialisation,
looking the kernel up, checking globals). For the short scans of the 2D models and the
small feature maps, that host time is most of a call (docs/triton_scan.md, last section).

:func:`launch` does the first launch of each *argument class* through Triton's own path,
keeps the ``CompiledKernel`` it returns, and later launches that kernel directly with the
same call Triton itself makes (``kernel.run(grid, stream, function, metadata, hooks, *args)``).
The argument class is strictly finer than what Triton specialises on (a tensor's dtype and
16-byte alignment; an int's value 1, divisibility by 16 and integer width; the constexpr
and launch-option values), so a cached kernel is always the one Triton would have picked.
tests/test_triton_fast_launch.py checks that on a GPU against ``JITFunction.warmup``.

Falls back to ``kernel[grid](...)`` under the interpreter, with launch hooks set (profilers),
for Triton releases whose launch protocol was not checked (before 3.6; 3.6 and 3.9 were read
and tested), for autotuned or heuristics-wrapped kernels, for argument types the key does not
know, and when ``MEDMAMBA_TRITON_FAST_LAUNCH=0``. Imports triton.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import triton

__all__ = ["launch", "arg_class", "enabled", "ENV_VAR"]

ENV_VAR = "MEDMAMBA_TRITON_FAST_LAUNCH"
_I32 = (-(1 << 31), 1 << 31)
_cache: dict[tuple, Any] = {}
_param_names: dict[int, tuple[tuple[str, ...], dict[str, Any], int]] = {}


def _version_ok() -> bool:
    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 6)


_VERSION_OK = _version_ok()
# the stream handle Triton's CUDA driver itself launches on (torch's current stream)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)


def enabled() -> bool:
    """Whether :func:`launch` may bypass ``JITFunction.run`` in this process right now
    (``MEDMAMBA_TRITON_FAST_LAUNCH``: ``0`` off; ``verify`` on, and every reuse of a cached kernel
    is checked against the kernel Triton's own lookup returns, for tests)."""
    return (_VERSION_OK and os.environ.get(ENV_VAR, "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") != "1")


class _Unknown(Exception):
    pass


def arg_class(a: Any) -> Any:
    """What a runtime argument contributes to the cache key (see the module docstring)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if a is None:
        return None
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        width = 0 if _I32[0] <= a < _I32[1] else 1 if -(1 << 63) <= a < (1 << 63) else 2  # i32, i64, u64
        return a == 1, a % 16 == 0, width
    if isinstance(a, float):
        return "f"
    raise _Unknown(type(a).__name__)


def _signature(fn) -> tuple[tuple[str, ...], dict[str, Any], int]:
    """(parameter names in order, their defaults, the number of leading runtime parameters) of a
    ``triton.jit`` function."""
    got = _param_names.get(id(fn))
    if got is None:
        if not (hasattr(fn, "fn") and hasattr(fn, "params")):  # an autotuner or heuristics wrapper: Triton's path
            raise _Unknown(type(fn).__name__)
        params = inspect.signature(fn.fn).parameters
        constexpr = [p.is_constexpr for p in fn.params]
        n_runtime = constexpr.index(True) if True in constexpr else len(constexpr)
        got = (tuple(params), {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty},
               n_runtime)
        _param_names[id(fn)] = got
    return got


def _key(fn, device: int, args: tuple, meta: dict) -> tuple:
    if len(args) > _signature(fn)[2]:
        raise _Unknown("a constexpr passed by position")  # its value, not its class, selects the kernel
    if any(isinstance(v, torch.Tensor) for v in meta.values()):
        raise _Unknown("a tensor passed by keyword")
    return id(fn), device, tuple(meta.items()), tuple(arg_class(a) for a in args)


def _hooks_set() -> bool:
    """Launch hooks (Triton's profilers) need Triton's own launch path and its launch metadata."""
    rt = triton.knobs.runtime
    return any(h is not None and bool(getattr(h, "calls", True)) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _verify(fn, grid: tuple, args: tuple, meta: dict, kernel) -> None:
    """Raise when Triton's own specialisation would pick another kernel than the cached one."""
    own = fn.warmup(*args, grid=grid, **meta)
    own = own.result() if hasattr(own, "result") else own
    if own is not kernel:
        raise AssertionError(f"fast launch of {getattr(fn, '__name__', fn)}: the cached kernel is not the one Triton picks "
                             f"for these arguments ({[arg_class(a) for a in args]})")


def launch(fn, grid: tuple, *args, **meta) -> None:
    """``fn[grid](*args, **meta)``, cheaper from the second call of an argument class on.

    ``args``: the runtime arguments, positional, in the kernel's parameter order; ``meta``:
    the constexpr parameters (by name) and launch options (``num_warps``...)."""
    if not enabled() or _hooks_set():
        fn[grid](*args, **meta)
        return
    device = torch.cuda.current_device()
    try:
        key = _key(fn, device, args, meta)
    except _Unknown:
        fn[grid](*args, **meta)
        return
    kernel = _cache.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **meta)
        if kernel is not None and hasattr(kernel, "packed_metadata"):
            _cache[key] = kernel
        return
    if os.environ.get(ENV_VAR) == "verify":
        _verify(fn, grid, args, meta, kernel)
    names, defaults, _ = _signature(fn)
    rest = tuple(meta[n] if n in meta else defaults[n] for n in names[len(args):])
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = _raw_stream(device)
    # Triton's own call (JITFunction.run), with no launch metadata and no hooks (none are set)
    kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *rest)
