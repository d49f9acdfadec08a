"""Backend choice, forcing (env var / argument), clear errors, and input validation of selective_scan_fn."""

from __future__ import annotations

import pytest
import torch

from napari_medmamba.ssm import dispatch, selective_scan_fn, selective_scan_ref
from napari_medmamba.ssm.dispatch import BackendUnavailableError, available_backends, resolve_backend


def small_inputs(dtype=torch.float64, groups=None):
    g = torch.Generator().manual_seed(0)
    batch, dim, length, n = 2, 4, 33, 8
    bc = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(
        u=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        A=-torch.rand(dim, n, generator=g, dtype=dtype),
        B=torch.randn(*bc, generator=g, dtype=dtype),
        C=torch.randn(*bc, generator=g, dtype=dtype),
        D=torch.randn(dim, generator=g, dtype=dtype),
        z=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta_bias=torch.randn(dim, generator=g, dtype=dtype),
    )


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.fixture
def no_gpu_backends(monkeypatch):
    """Make triton and mamba_ssm unavailable whatever this machine has."""
    monkeypatch.setattr(dispatch, "_triton_status", lambda: (False, "needs triton and a CUDA GPU: pip install x"))
    monkeypatch.setattr("napari_medmamba.ssm.mamba_ssm_backend.is_installed", lambda: False)


def test_auto_picks_cpu_for_cpu_tensors():
    assert resolve_backend("cpu") == "cpu"
    assert "cpu" in available_backends()


def test_auto_on_cuda_falls_back_to_torch_without_triton(no_gpu_backends):
    assert resolve_backend("cuda") == "torch"


def test_auto_on_cuda_prefers_triton_when_available(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_status", lambda: (True, ""))
    assert resolve_backend("cuda") == "triton"


def test_auto_falls_back_to_torch_without_numba(monkeypatch):
    monkeypatch.setattr("napari_medmamba.ssm.cpu.is_available", lambda: False)
    assert resolve_backend("cpu") == "torch"
    with pytest.raises(BackendUnavailableError, match="numba"):
        resolve_backend("cpu", "cpu")


@pytest.mark.parametrize("name", ["reference", "torch", "cpu"])
def test_env_var_forces_backend(monkeypatch, name):
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    assert resolve_backend("cpu") == name
    called = []
    real = dispatch._implementation

    def spy(chosen):
        called.append(chosen)
        return real(chosen)

    monkeypatch.setattr(dispatch, "_implementation", spy)
    inputs = small_inputs()
    out, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    ref, ref_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert called == [name]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)


def test_argument_overrides_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert resolve_backend("cpu", "torch") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "AUTO")
    assert resolve_backend("cpu") == "cpu"


def test_gradients_flow_through_dispatch():
    inputs = {k: v.requires_grad_() for k, v in small_inputs(groups=2).items()}
    out = selective_scan_fn(**inputs, delta_softplus=True)
    grads = torch.autograd.grad(out.sum(), list(inputs.values()))
    ref_grads = torch.autograd.grad(selective_scan_ref(**inputs, delta_softplus=True).sum(), list(inputs.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["triton", "mamba_ssm"])
def test_gpu_backends_refuse_cpu_tensors(name):
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        selective_scan_fn(**small_inputs(), backend=name)


def test_env_forced_gpu_backend_on_cpu_tensors_errors(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="triton"):
        selective_scan_fn(**small_inputs())


def test_cpu_backend_refuses_cuda_tensors():
    with pytest.raises(BackendUnavailableError, match="needs CPU tensors"):
        resolve_backend("cuda", "cpu")


def test_unavailable_gpu_backends_name_what_to_install(no_gpu_backends):
    with pytest.raises(BackendUnavailableError, match="pip install"):
        resolve_backend("cuda", "triton")
    with pytest.raises(BackendUnavailableError, match="mamba-ssm"):
        resolve_backend("cuda", "mamba_ssm")
    assert {"triton", "mamba_ssm"}.isdisjoint(available_backends())
    assert {"reference", "torch", "cpu"} <= set(available_backends())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_mamba_ssm_needs_a_gpu_even_if_installed(monkeypatch):
    monkeypatch.setattr("napari_medmamba.ssm.mamba_ssm_backend.is_installed", lambda: True)
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        resolve_backend("cuda", "mamba_ssm")


def test_mamba_ssm_wrapper_says_what_to_install_when_missing(monkeypatch):
    import builtins

    from napari_medmamba.ssm import mamba_ssm_backend

    real_import = builtins.__import__

    def no_mamba(name, *args, **kwargs):
        if name.startswith("mamba_ssm"):
            raise ImportError("No module named 'mamba_ssm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mamba)
    with pytest.raises(ImportError, match=r"napari-medmamba\[mamba\]"):
        mamba_ssm_backend.selective_scan_mamba_ssm(**small_inputs())


def test_unknown_backend_name(monkeypatch):
    with pytest.raises(ValueError, match="choose from auto"):
        resolve_backend("cpu", "cuda-magic")
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        resolve_backend("cpu")


@pytest.mark.parametrize("change,error,message", [
    (dict(u=torch.zeros(2, 4)), ValueError, r"u must be \(batch, dim, L\)"),
    (dict(delta=torch.zeros(2, 4, 32)), ValueError, "delta must have u's shape"),
    (dict(z=torch.zeros(2, 4, 32)), ValueError, "z must have u's shape"),
    (dict(A=torch.zeros(3, 8)), ValueError, r"A must be \(dim, N\)"),
    (dict(B=torch.zeros(2, 7, 33)), ValueError, "B must be"),
    (dict(C=torch.zeros(2, 3, 8, 33)), ValueError, "3 groups, which must divide dim=4"),
    (dict(C=torch.zeros(2, 8)), ValueError, r"C must be \(batch, N, L\)"),
    (dict(D=torch.zeros(5)), ValueError, r"D must have shape \(dim,\)"),
    (dict(delta_bias=torch.zeros(4, 1)), ValueError, "delta_bias must have shape"),
    (dict(u=torch.zeros(2, 4, 33, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(A=torch.zeros(4, 8, dtype=torch.complex64)), TypeError, "complex"),
    (dict(B=torch.zeros(2, 8, 33, device="meta")), ValueError, "one device"),
    (dict(D=[1.0, 2.0]), TypeError, "D must be a torch.Tensor"),
])
def test_validation_messages(change, error, message):
    inputs = small_inputs(dtype=torch.float32)
    inputs.update(change)
    with pytest.raises(error, match=message):
        selective_scan_fn(**inputs)
