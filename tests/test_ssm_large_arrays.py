"""Huge-page-backed output arrays of the CPU scan: same contents and lifetime as NumPy's, same scan results."""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pytest
import torch

from napari_medmamba.ssm import _large_arrays
from napari_medmamba.ssm.cpu import selective_scan_cpu

from test_ssm_cpu import make_inputs, run_with_grads

def _owner(arr: np.ndarray):
    while isinstance(arr, np.ndarray) and arr.base is not None:
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


needs_madvise = pytest.mark.skipif(not _large_arrays._CAN_ADVISE, reason="needs Linux MADV_HUGEPAGE")


@needs_madvise
def test_large_arrays_are_mapped_aligned_zeroed_and_writable():
    shape = (2, 3, (_large_arrays.HUGE_MIN_BYTES // 24) + 5)
    for make in (_large_arrays.empty, _large_arrays.zeros):
        arr = make(shape, np.float32)
        assert arr.shape == shape and arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.writeable
        assert isinstance(_owner(arr), mmap.mmap)
        assert arr.ctypes.data % (2 << 20) == 0  # starts on a huge-page boundary
        assert not arr.any()
        arr[-1, -1, -1] = 7.0
        assert arr.sum() == 7.0


@needs_madvise
def test_environment_switch_turns_mappings_off(monkeypatch: pytest.MonkeyPatch):
    shape = (_large_arrays.HUGE_MIN_BYTES // 4,)
    assert isinstance(_owner(_large_arrays.empty(shape, np.float32)), mmap.mmap)
    monkeypatch.setenv(_large_arrays.ENV_VAR, "0")
    plain = _large_arrays.zeros(shape, np.float32)
    assert plain.base is None and not plain.any()


def test_small_arrays_are_plain_numpy():
    arr = _large_arrays.zeros((4, 5), np.float64)
    assert arr.base is None and arr.dtype == np.float64 and not arr.any()
    assert _large_arrays.empty((3,), np.float32).base is None


@needs_madvise
def test_tensor_keeps_the_mapping_alive():
    arr = _large_arrays.zeros((_large_arrays.HUGE_MIN_BYTES // 4,), np.float32)
    tensor = torch.from_numpy(arr)
    tensor[123] = 5.0
    del arr
    gc.collect()
    _ = [np.ones(1 << 20) for _ in range(4)]  # churn the allocator
    assert tensor[123].item() == 5.0 and tensor.sum().item() == 5.0


@needs_madvise
def test_scan_on_mapped_outputs_matches_plain_outputs(monkeypatch: pytest.MonkeyPatch):
    """Every output of the forward and backward kernels on mapped arrays (threshold forced to 0)."""
    inputs = make_inputs(2, 6, 300, 16, None, dtype=torch.float32, seed=11)
    monkeypatch.setattr(_large_arrays, "_CAN_ADVISE", False)
    plain = run_with_grads(selective_scan_cpu, inputs, True, True)
    monkeypatch.setattr(_large_arrays, "_CAN_ADVISE", True)
    monkeypatch.setattr(_large_arrays, "HUGE_MIN_BYTES", 0)
    mapped = run_with_grads(selective_scan_cpu, inputs, True, True)
    torch.testing.assert_close(mapped[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(mapped[1], plain[1], rtol=0, atol=0)
    for name in plain[2]:
        torch.testing.assert_close(mapped[2][name], plain[2][name], rtol=0, atol=0, msg=name)
