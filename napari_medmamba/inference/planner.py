"""Where and how many tiles at a time: device choice, batch size from free memory, OOM policy."""

from __future__ import annotations

import os
import time
from typing import Callable

import psutil
import torch

__all__ = [
    "ACTIVATION_BYTES_PER_VOXEL",
    "CPU_BATCH_VOXELS",
    "choose_device",
    "free_memory_bytes",
    "plan_batch_size",
    "THREADS_ENV",
    "inference_threads",
    "physical_cores",
    "TilePredictor",
]

ACTIVATION_BYTES_PER_VOXEL = 2048
"""Rough peak activation memory of a U-Net-sized network per input voxel and sample (fp32)."""

MAX_BATCH = {"cpu": 4, "cuda": 32}
"""Batching beyond a few tiles buys nothing on a CPU; on a GPU memory decides."""

CPU_BATCH_VOXELS = 1 << 20
"""On a CPU a batch stops at about a million voxels: bigger batches are no faster there and would hold
gigabytes of activations (a 64x128x128 CT tile is already one batch)."""


def choose_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available, else the CPU; anything else is taken as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on CUDA, psutil's available RAM otherwise."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def plan_batch_size(
    free_bytes: int,
    patch_voxels: int,
    device_type: str,
    bytes_per_voxel: int = ACTIVATION_BYTES_PER_VOXEL,
    fraction: float = 0.5,
) -> int:
    """Tiles per batch that fit ``fraction`` of ``free_bytes``, between 1 and the device's cap."""
    per_tile = max(1, patch_voxels * bytes_per_voxel)
    fit = int(free_bytes * fraction) // per_tile
    if device_type == "cpu":
        fit = min(fit, CPU_BATCH_VOXELS // max(1, patch_voxels))
    return max(1, min(MAX_BATCH.get(device_type, MAX_BATCH["cuda"]), fit))


def physical_cores() -> int:
    """Number of physical CPU cores (logical count when unknown)."""
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


THREADS_ENV = "MEDMAMBA_NUM_THREADS"
"""Environment variable capping the CPU threads of one ``segment()`` call (shared machines, batch workers)."""


def inference_threads() -> int:
    """Intra-op threads for one ``segment()`` call: one per physical core, at most ``$MEDMAMBA_NUM_THREADS``."""
    cores = physical_cores()
    cap = os.environ.get(THREADS_ENV, "").strip()
    if not cap:
        return cores
    try:
        return max(1, min(cores, int(cap)))
    except ValueError:
        raise ValueError(f"{THREADS_ENV}={cap!r} is not a whole number of threads") from None


class TilePredictor:
    """Runs tile batches with the OOM policy: halve the batch, then at batch 1 fall back to the CPU.

    ``forward(batch, device)`` returns CPU probabilities for a CPU batch, computed on
    ``device``; ``move(device)`` moves the model. Nothing is lost on an OOM: the failed
    chunk is simply run again. ``forward_seconds`` sums the pure forward times.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.device], torch.Tensor],
        move: Callable[[torch.device], None],
        device: torch.device,
        batch_size: int,
        warn: Callable[[str], None],
    ) -> None:
        self.forward = forward
        self.move = move
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.warn = warn
        self.forward_seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        start = 0
        while start < batch.shape[0]:
            chunk = batch[start : start + self.batch_size]
            try:
                t0 = time.perf_counter()
                out = self.forward(chunk, self.device)
                self.forward_seconds += time.perf_counter() - t0
            except torch.cuda.OutOfMemoryError:
                self._after_oom()
                continue
            outputs.append(out)
            start += chunk.shape[0]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _after_oom(self) -> None:
        torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size //= 2
            self.warn(f"out of memory on {self.device}: tile batch reduced to {self.batch_size}")
            return
        if self.device.type == "cpu":
            raise MemoryError("out of memory on the CPU with a batch of one tile")
        self.warn(f"out of memory on {self.device} even with one tile per batch: continuing on the CPU (slower)")
        self.device = torch.device("cpu")
        self.move(self.device)
