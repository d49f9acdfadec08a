"""Launch parameters of the Triton selective scan, derived from the shape and the GPU.

No triton import here. Every field can be overridden (tests force tiny tiles so that a few
dozen steps already cross several tiles and chunks; benchmarks sweep them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import torch

__all__ = ["ScanConfig", "choose_config", "next_pow2"]


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n and is <= cap (at least 1)."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


@dataclass(frozen=True)
class ScanConfig:
    """T: steps per tile (one associative scan; also the backward's tile and the spacing of
    the states the forward saves). block_d: channels per forward program; chunk_tiles: tiles
    per forward chunk (one program walks a chunk). bwd_block_d: channels per backward program
    in one sub-block; bwd_split: backward programs per
    (batch, group, tile), each looping over its share of the sub-blocks. unroll_n: the forward
    kernels unroll their loop over the state columns (independent scans the compiler can interleave)."""

    T: int = 128
    block_d: int = 4
    chunk_tiles: int = 16
    num_warps: int = 2
    bwd_block_d: int = 4
    bwd_split: int = 1
    bwd_num_warps: int = 1
    combine_lanes: int = 64
    combine_cb: int = 32
    unroll_n: bool = False


@lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_config(batch: int, dim: int, length: int, n_state: int, groups: int,
                  device: torch.device, half: bool = False, **override) -> ScanConfig:
    """:func:`_choose_config`, memoised per shape, device and overrides (it runs on every call)."""
    return _choose_config(batch, dim, length, n_state, groups, device, half, tuple(sorted(override.items())))


@lru_cache(maxsize=256)
def _choose_config(batch: int, dim: int, length: int, n_state: int, groups: int,
                   device: torch.device, half: bool, override_items: tuple) -> ScanConfig:
    """Shape-derived parameters: (block_d x T) tiles; enough chunks along the sequence for
    ~16 programs per SM (one chunk when the channels alone give that); backward sub-blocks of
    ~512 channel-steps, programs split over channels while there are fewer than ~16 per SM.

    ``half`` (bf16/fp16 inputs): the forward runs one warp per program with its state-column loop
    unrolled, 1.3-1.8x faster than two warps and a loop for these inputs on an H200, but slower
    for fp32 (benchmarks/scan_sweep.py; docs/benchmarks.md, 2026-11-26 session 10)."""
    override = dict(override_items)
    unknown = sorted(set(override) - {f.name for f in fields(ScanConfig)})
    if unknown:
        raise ValueError(f"unknown launch parameters of the Triton scan: {', '.join(unknown)} "
                         f"(known: {', '.join(f.name for f in fields(ScanConfig))})")
    dflt = ScanConfig()
    T = override.get("T") or max(16, min(dflt.T, next_pow2(length)))
    dpg = dim // groups
    block_d = override.get("block_d") or _pow2_divisor(dpg, dflt.block_d)
    n_tiles = -(-length // T)
    target = 16 * _sm_count(device)
    base = batch * (dim // block_d)
    want_chunks = max(1, target // base)
    chunk_tiles = override.get("chunk_tiles") or max(1, -(-n_tiles // want_chunks))
    bwd_block_d = override.get("bwd_block_d") or _pow2_divisor(dpg, max(1, 512 // T))
    subs = dpg // bwd_block_d
    bwd_split = override.get("bwd_split")
    if not bwd_split:
        bwd_split = 1
        while n_tiles * batch * groups * bwd_split < target and subs % (2 * bwd_split) == 0:
            bwd_split *= 2
    cfg = ScanConfig(T=T, block_d=block_d, chunk_tiles=chunk_tiles, bwd_block_d=bwd_block_d,
                     bwd_split=bwd_split, unroll_n=half, num_warps=1 if half else dflt.num_warps)
    done = ("T", "block_d", "chunk_tiles", "bwd_block_d", "bwd_split")
    rest = {f.name: override[f.name] for f in fields(ScanConfig)
            if override.get(f.name) is not None and f.name not in done}
    return replace(cfg, **rest)
