"""Launch parameters of the Triton selective scan, derived from the shape and the GPU.

No triton import here. Every field can be overridden (tests force tiny tiles so that a few
dozen steps already cross several tiles and chunks; benchmarks sweep them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    """Tile length T (steps per associative scan), channels per forward program, tiles per
    forward chunk, channels per backward sub-block, backward channel splits and warps."""

    T: int = 64
    block_d: int = 4
    chunk_tiles: int = 16
    num_warps: int = 4
    bwd_block_d: int = 2
    bwd_split: int = 1
    bwd_num_warps: int = 4
    combine_lanes: int = 64
    combine_cb: int = 32


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_config(batch: int, dim: int, length: int, n_state: int, groups: int,
                  device: torch.device, **override) -> ScanConfig:
    """Shape-derived parameters: ~4096-element (channels x N x T) tiles per program, enough
    chunks along the sequence for ~8 programs per SM, one chunk when that is already met."""
    bn = next_pow2(n_state)
    T = override.get("T") or max(16, min(64, next_pow2(length)))
    dpg = dim // groups
    block_d = override.get("block_d") or _pow2_divisor(dpg, max(1, 4096 // (bn * T)))
    n_tiles = -(-length // T)
    base = batch * (dim // block_d)
    target = 8 * _sm_count(device)
    want_chunks = max(1, target // base)
    chunk_tiles = override.get("chunk_tiles") or max(1, -(-n_tiles // want_chunks))
    bwd_block_d = override.get("bwd_block_d") or _pow2_divisor(dpg, max(1, 2048 // (bn * T)))
    subs = dpg // bwd_block_d
    bwd_split = override.get("bwd_split")
    if not bwd_split:
        need = max(1, -(-target // max(1, batch * groups * n_tiles)))
        bwd_split = 1
        while bwd_split < need and subs % (bwd_split * 2) == 0:
            bwd_split *= 2
    cfg = ScanConfig(T=T, block_d=block_d, chunk_tiles=chunk_tiles, bwd_block_d=bwd_block_d,
                     bwd_split=bwd_split)
    rest = {k: v for k, v in override.items() if k in ScanConfig.__dataclass_fields__
            and k not in ("T", "block_d", "chunk_tiles", "bwd_block_d", "bwd_split") and v}
    return replace(cfg, **rest)
