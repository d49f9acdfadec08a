"""Device choice, batch size from free memory, and the OOM policy (simulated: no GPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medmamba.inference import segment
from napari_medmamba.inference.planner import CPU_BATCH_VOXELS, MAX_BATCH, TilePredictor, choose_device, free_memory_bytes, plan_batch_size
from napari_medmamba.io.volume import Geometry, Volume
from test_inference_support import TinyUNet, contract

GIB = 1 << 30


def test_choose_device() -> None:
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert free_memory_bytes(torch.device("cpu")) > 0


def test_batch_size_follows_free_memory() -> None:
    patch = 128**3
    sizes = [plan_batch_size(free, patch, "cuda", bytes_per_voxel=1024) for free in (0, 2 * GIB, 8 * GIB, 64 * GIB, 10**6 * GIB)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == MAX_BATCH["cuda"]
    assert plan_batch_size(8 * GIB, patch, "cuda", bytes_per_voxel=1024) == 2  # 4 GiB budget / 2 GiB per tile
    assert plan_batch_size(10**6 * GIB, 40 * 56 * 40, "cpu") == MAX_BATCH["cpu"]  # small tiles: a few per batch
    # big tiles on a CPU: one per batch (no faster batched, gigabytes of activations)
    assert plan_batch_size(10**6 * GIB, 64 * 128 * 128, "cpu") == 1
    assert plan_batch_size(10**6 * GIB, 64 * 64 * 64, "cpu") == CPU_BATCH_VOXELS // (64 * 64 * 64) == 4


def _fake_forward(calls: list[tuple[int, str]], gpu_limit: int):
    """Computes on the CPU whatever the device says; a fake 'cuda' holds at most ``gpu_limit`` tiles."""

    def forward(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        calls.append((batch.shape[0], device.type))
        if device.type == "cuda" and batch.shape[0] > gpu_limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch * 2

    return forward


def test_oom_halves_the_batch_and_loses_nothing() -> None:
    calls: list[tuple[int, str]] = []
    warnings: list[str] = []
    moved: list[torch.device] = []
    predictor = TilePredictor(_fake_forward(calls, gpu_limit=2), moved.append, torch.device("cuda"), 8, warnings.append)
    batch = torch.arange(8.0).reshape(8, 1)
    torch.testing.assert_close(predictor(batch), batch * 2)
    assert predictor.batch_size == 2 and predictor.device.type == "cuda" and not moved
    assert [c for c in calls if c[0] <= 2] == [(2, "cuda")] * 4
    assert len(warnings) == 2 and "reduced to 2" in warnings[-1]


def test_oom_at_batch_one_falls_back_to_cpu_with_a_warning() -> None:
    calls: list[tuple[int, str]] = []
    warnings: list[str] = []
    moved: list[torch.device] = []
    predictor = TilePredictor(_fake_forward(calls, gpu_limit=0), moved.append, torch.device("cuda"), 4, warnings.append)
    batch = torch.arange(6.0).reshape(6, 1)
    torch.testing.assert_close(predictor(batch), batch * 2)
    assert moved == [torch.device("cpu")] and predictor.device.type == "cpu"
    assert "continuing on the CPU" in warnings[-1]
    assert calls[-1] == (1, "cpu") and sum(n for n, d in calls if d == "cpu") == 6


def test_oom_on_the_cpu_at_batch_one_is_a_memory_error() -> None:
    def forward(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("simulated")

    predictor = TilePredictor(forward, lambda d: None, torch.device("cpu"), 2, lambda m: None)
    with pytest.raises(MemoryError):
        predictor(torch.zeros(2, 1))


class OomAboveOne(TinyUNet):
    """A real network that 'runs out of memory' on batches of more than one tile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(x)


def test_segment_survives_oom_with_the_same_result() -> None:
    array = np.random.default_rng(3).normal(size=(24, 20, 20)).astype(np.float32)
    volume = Volume(array, Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
    reference = segment(volume, (TinyUNet(), contract(patch=(8, 16, 16))), device="cpu")
    result = segment(volume, (OomAboveOne(), contract(patch=(8, 16, 16))), device="cpu")
    assert any("reduced" in w for w in result.warnings) and not reference.warnings
    np.testing.assert_array_equal(result.labels.array, reference.labels.array)
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-3)


def test_inference_threads_honours_the_environment_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_medmamba.inference.planner import THREADS_ENV, inference_threads, physical_cores

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert inference_threads() == physical_cores()
    monkeypatch.setenv(THREADS_ENV, "1")
    assert inference_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "999")
    assert inference_threads() == physical_cores()  # a cap, never more than the cores
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(ValueError, match="MEDMAMBA_NUM_THREADS"):
        inference_threads()
