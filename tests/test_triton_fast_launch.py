"""``napari_medmamba.ssm.triton.fast_launch``: cached launches of our Triton kernels.

CPU: the argument classes, the switches, and the launch protocol against a stand-in kernel (first call of
a class through ``fn[grid]``, later calls straight to the compiled kernel with every parameter in
signature order). CUDA (marked ``cuda``): with ``MEDMAMBA_TRITON_FAST_LAUNCH=verify`` every reuse of a
cached kernel is checked against the kernel Triton's own lookup picks, over aligned and misaligned
inputs, both scan paths, fp32 and bf16, and a LightM-UNet training step (conv1d, LayerNorm, channel mix);
outputs and gradients must equal those of Triton's own launch path bit for bit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


@pytest.fixture()
def fl():
    from napari_medmamba.ssm.triton import fast_launch

    fast_launch._cache.clear()
    yield fast_launch
    fast_launch._cache.clear()


def test_argument_classes_separate_what_triton_specialises_on(fl) -> None:
    base = torch.zeros(64)
    aligned, misaligned = base[4:], base[1:]  # 16 and 4 bytes past an aligned start
    assert fl.arg_class(aligned) == (torch.float32, True)
    assert fl.arg_class(misaligned) == (torch.float32, False)
    assert fl.arg_class(aligned) != fl.arg_class(aligned.to(torch.bfloat16))
    c = fl.arg_class
    assert c(1) != c(2) and c(16) != c(17)  # value 1; divisible by 16
    assert c(2) == c(17) == c(-3) and c(16) == c(32) == c(-16)
    assert c(2 ** 31 - 16) != c(2 ** 31) != c(2 ** 63)  # i32, i64, u64
    assert c(2 ** 31) == c(2 ** 40) and c(-(2 ** 31)) != c(-(2 ** 31) - 16)
    assert fl.arg_class(True) != fl.arg_class(1) and fl.arg_class(True) != fl.arg_class(False)
    assert fl.arg_class(None) is None and fl.arg_class(0.5) == fl.arg_class(2.0)
    with pytest.raises(fl._Unknown):
        fl.arg_class("text")


def test_switches(fl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fl.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fl.enabled() is fl._VERSION_OK
    monkeypatch.setenv(fl.ENV_VAR, "0")
    assert not fl.enabled()
    monkeypatch.setenv(fl.ENV_VAR, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fl.enabled()


class _FakeKernel:
    packed_metadata = "meta"
    function = "fn-handle"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *args) -> None:
        self.calls.append(args)


class _FakeJit:
    """Stands in for a ``triton.jit`` function: ``fn[grid](...)`` records the call, returns a kernel."""

    def __init__(self) -> None:
        def kernel(x_ptr, n, s, BLOCK, FLAG=True):  # noqa: N803 - Triton's constexpr style
            pass

        self.fn = kernel
        self.params = [SimpleNamespace(is_constexpr=name.isupper()) for name in ("x_ptr", "n", "s", "BLOCK", "FLAG")]
        self.jit_calls: list[tuple] = []
        self.kernels: list[_FakeKernel] = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.jit_calls.append((grid, args, meta))
            self.kernels.append(_FakeKernel())
            return self.kernels[-1]

        return call


def test_launch_protocol_on_a_stand_in_kernel(fl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fl.ENV_VAR, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fl, "_VERSION_OK", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fl, "_raw_stream", lambda device: 1234)
    fn = _FakeJit()
    base = torch.zeros(64)
    second = base[8:]
    fl.launch(fn, (3,), base[4:], 100, 7, BLOCK=32, num_warps=2)
    assert len(fn.jit_calls) == 1  # first call of the class: Triton's own path
    fl.launch(fn, (5, 2), second, 200, 9, BLOCK=32, num_warps=2)  # same class: aligned, ints neither 1 nor /16
    assert len(fn.jit_calls) == 1
    (call,) = fn.kernels[0].calls
    # grid padded to 3, the stream, Triton's handles, no launch metadata or hooks, then every parameter in
    # signature order: the runtime arguments, BLOCK, and FLAG's default
    assert call[:9] == (5, 2, 1, 1234, "fn-handle", "meta", None, None, None)
    assert call[9] is second and call[10:] == (200, 9, 32, True)
    fl.launch(fn, (5,), base[1:], 200, 9, BLOCK=32, num_warps=2)  # misaligned: a new class
    fl.launch(fn, (5,), base[4:], 1, 9, BLOCK=32, num_warps=2)  # n == 1: a new class
    fl.launch(fn, (5,), base[4:], 200, 9, BLOCK=64, num_warps=2)  # another constexpr: a new class
    fl.launch(fn, (5,), base[4:], 200, 9, BLOCK=32, num_warps=4)  # another launch option: a new class
    assert len(fn.jit_calls) == 5
    monkeypatch.setenv(fl.ENV_VAR, "0")
    fl.launch(fn, (5, 2), base[8:], 200, 9, BLOCK=32, num_warps=2)
    assert len(fn.jit_calls) == 6 and len(fn.kernels[0].calls) == 1  # switched off: always Triton's path
    monkeypatch.setenv(fl.ENV_VAR, "1")
    fl.launch(fn, (5,), base[4:], 200, 9, BLOCK=torch.zeros(1), num_warps=2)  # tensor by keyword: no caching
    fl.launch(fn, (5,), base[4:], 200, 9, BLOCK=torch.zeros(1), num_warps=2)
    assert len(fn.jit_calls) == 8
    fl.launch(fn, (5,), base[4:], 200, 9, 32, num_warps=2)  # a constexpr by position: no caching
    fl.launch(fn, (5,), base[4:], 200, 9, 64, num_warps=2)
    assert len(fn.jit_calls) == 10
    wrapped = _FakeJit()
    del wrapped.params  # like an autotuner around a kernel: always Triton's path
    for _ in range(2):
        fl.launch(wrapped, (5,), base[4:], 200, 9, BLOCK=32, num_warps=2)
    assert len(wrapped.jit_calls) == 2


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + triton")


def _scan_outputs(ins: dict, config: dict, dout: torch.Tensor) -> list[torch.Tensor]:
    from napari_medmamba.ssm.triton.autograd import selective_scan_triton

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in ins.items() if v is not None}
    args = {k: leaves.get(k) for k in ins}
    out = selective_scan_triton(**args, delta_softplus=True, config=config)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return [out, *grads]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["short", "chunked"])
def test_cuda_cached_kernels_are_the_ones_triton_picks(dtype: str, path: str, fl,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from test_ssm_triton import make_inputs

    shapes = [(1, 48, 256, 16), (2, 64, 200, 16), (1, 32, 17, 16)] if path == "short" else \
        [(2, 64, 4096, 16), (1, 32, 3000, 16), (1, 16, 16384, 16)]
    for shape in shapes:
        for offset in (0, 1):  # offset 1: every activation starts 1 element (2-4 bytes) past an aligned address
            ins = make_inputs(shape, dtype=dtype, device="cuda")
            if offset:
                ins = {k: (torch.cat([v.new_zeros(1), v.flatten()])[1:].view(v.shape)
                           if k in {"u", "delta", "z", "B", "C"} else v) for k, v in ins.items()}
            dout = torch.randn(shape[:3], device="cuda").to(ins["u"].dtype)
            monkeypatch.setenv(fl.ENV_VAR, "0")
            want = _scan_outputs(ins, {"path": path}, dout)
            monkeypatch.setenv(fl.ENV_VAR, "verify")
            for _ in range(2):  # the second round reuses cached kernels, each checked against Triton's pick
                got = _scan_outputs(ins, {"path": path}, dout)
                for g, w in zip(got, want):
                    assert torch.equal(g, w)
    assert len(fl._cache) >= 2


@pytest.mark.cuda
@CUDA
def test_cuda_lightm_unet_step_with_cached_launches(fl, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_medmamba.models.lightm_unet import LightMUNet

    torch.manual_seed(0)
    net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2).cuda()
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")

    def step() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        out = net(x)
        out.square().mean().backward()
        return [out.detach()] + [p.grad.detach().clone() for p in net.parameters()]

    monkeypatch.setenv(fl.ENV_VAR, "0")
    want, again = step(), step()
    # PyTorch's own backward is not bit-reproducible (cuDNN and upsampling sum with atomics): the tolerance is
    # 4x the difference between two identical steps on Triton's launch path, at least 1e-4 of the largest
    # gradient (a wrongly specialised kernel is off by the gradients' own size)
    noise = max(float((a - w).abs().max()) for a, w in zip(again[1:], want[1:]))
    scale = max(float(w.abs().max()) for w in want[1:])
    monkeypatch.setenv(fl.ENV_VAR, "verify")
    for _ in range(2):
        got = step()
        assert torch.equal(got[0], want[0])  # the forward is deterministic
        for g, w in zip(got[1:], want[1:]):
            assert float((g - w).abs().max()) <= max(4 * noise, 1e-4 * scale)
    names = {k[0] for k in fl._cache}
    assert len(names) >= 5  # scan, conv1d and LayerNorm kernels, forward and backward
