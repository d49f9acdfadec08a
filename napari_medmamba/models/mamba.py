"""The Mamba (S6) block, with the parameter names, shapes and initialisation of
``mamba_ssm.modules.mamba_simple.Mamba``; forward is that module's non-fused path.

Every selective-scan call made by the models of this package goes through :func:`selective_scan`,
so that :mod:`napari_medmamba.models.scan_shapes` can record the calls without running them.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .. import ssm as _ssm

__all__ = ["CPU_BF16_ENV", "CPU_LAYERS_ENV", "TRITON_LAYERS_ENV", "Mamba", "PieceCarry", "causal_conv1d_silu",
           "channels_first_layer_norm", "channels_first_linear", "cpu_inference", "cpu_layer_kernels",
           "cpu_multiplies_bf16", "cpu_streaming", "dt_bias_init", "float32_products", "piece_array",
           "piece_array_like", "piece_product_dtype", "piece_tensor", "scan_override", "selective_scan"]

CPU_LAYERS_ENV = "MEDMAMBA_CPU_LAYERS"
"""Set to 0 to run CPU inference through PyTorch's ops instead of the fused numba kernels (e.g. to compare)."""
CPU_BF16_ENV = "MEDMAMBA_CPU_BF16"
"""Set to 0 to keep the CPU piece path's projections in float32 on CPUs that multiply bfloat16 natively
(:func:`piece_product_dtype`)."""
TRITON_LAYERS_ENV = "MEDMAMBA_TRITON_LAYERS"
"""Set to 0 to run the Mamba layers' conv1d + SiLU, LayerNorm and dt_proj weight gradient on CUDA through
PyTorch's ops instead of the Triton kernels (``ssm.triton.conv1d``, ``layer_norm``, ``channel_mix``), e.g. to
compare."""
_NARROW_MAX = 8
"""Inputs this narrow (dt_proj's rank) go to ``_cpu_numba_layers.channel_mix_narrow`` in CPU inference (wider
ones are faster as BLAS matrix products)."""

_OVERRIDE: list[Callable[..., torch.Tensor]] = []
_FLOAT32_PRODUCTS = threading.local()  # .depth: nesting of float32_products() in this thread
_LOG2E = 1.4426950408889634


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False) -> torch.Tensor:
    """``napari_medmamba.ssm.selective_scan_fn`` (or the innermost :func:`scan_override` function)."""
    fn = _OVERRIDE[-1] if _OVERRIDE else _ssm.selective_scan_fn
    return fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


@contextmanager
def scan_override(fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Within the block, the models' selective-scan calls go to ``fn`` (same signature)."""
    _OVERRIDE.append(fn)
    try:
        yield
    finally:
        _OVERRIDE.remove(fn)


def dt_bias_init(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float,
                 device=None, dtype=None) -> torch.Tensor:
    """A bias whose softplus is log-uniform in [dt_min, dt_max] (inverse softplus of a sampled dt)."""
    dt = torch.exp(torch.rand(d_inner, device=device, dtype=dtype) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(nn.Module):
    """Mamba block on (batch, length, d_model) sequences; state dict compatible with mamba_ssm's ``Mamba``."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path  # accepted for compatibility; the non-fused path is always used
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)

        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', not {dt_init!r}")
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor, **fk))
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def scan_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Channels-first (B, d_model, L) -> the scan's (u, delta, B, C, z): in_proj, causal depthwise conv1d,
        SiLU, x_proj, dt_proj, all as matrix products on (B, channels, L), so no transposed copies are made.

        u, delta, z are (B, d_inner, L) (z a view into in_proj's output), B and C (B, d_state, L).
        """
        xz = channels_first_linear(self.in_proj, x)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_silu(self.conv1d, x)
        x_dbl = channels_first_linear(self.x_proj, x)  # (B, r + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = _channel_mix(self.dt_proj.weight, dt)  # (B, d_inner, L); the bias goes in as delta_bias
        return x, dt, B.contiguous(), C.contiguous(), z

    def scan(self, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        """The gated selective scan of :meth:`scan_inputs`' outputs -> (B, d_inner, L)."""
        A = -torch.exp(self.A_log.float())
        return selective_scan(u, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True)

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_model, L) -> (B, d_model, L): the block on channels-first tokens (a feature map's own layout)."""
        return channels_first_linear(self.out_proj, self.scan(*self.scan_inputs(x)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model), as mamba_ssm's ``Mamba``."""
        return self.forward_channels_first(hidden_states.transpose(1, 2)).transpose(1, 2)

    def start_pieces(self, batch: int) -> "PieceCarry":
        """What :meth:`forward_piece` carries from one piece of a sequence to the next, at the sequence's start."""
        p = self.A_log
        a2 = (-torch.exp(p.detach().float()) * _LOG2E).t().contiguous()
        history = p.new_zeros(batch, self.d_conv - 1, self.d_inner)
        state = p.new_zeros(batch, self.d_state, self.d_inner)
        dt = piece_product_dtype()
        d, w_in, b_in = self.d_inner, self.in_proj.weight, self.in_proj.bias

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dt).contiguous()

        products = (cast(w_in[:d]), cast(None if b_in is None else b_in[:d]), cast(w_in[d:]),
                    cast(None if b_in is None else b_in[d:]), cast(self.x_proj.weight), cast(self.out_proj.weight),
                    cast(self.out_proj.bias))
        return PieceCarry(history, state, a2, self.dt_proj.weight.detach().float().t().contiguous(), products)

    def forward_piece(self, x: torch.Tensor, carry: "PieceCarry") -> torch.Tensor:
        """The block on one token-major piece (B, T, d_model) of a longer sequence, continuing from ``carry``
        (updated in place); CPU inference without autocast only (:func:`cpu_streaming`).

        Every projection is a (T, in) x (in, out) matrix product (about 3x the BLAS rate of the channels-first
        product on a 2-core EPYC), in ``carry``'s product dtype (:func:`piece_product_dtype`), and every
        intermediate stays in the cache; the conv1d and the scan are the token-major numba kernels of
        ``ssm._cpu_numba_tokens``, which compute in float32 and read and write the products' inputs and outputs
        in the products' dtype (no separate cast passes). Returns (B, T, d_model) in the products' dtype.
        """
        from ..ssm import _cpu_numba_tokens as kernels

        r, n = self.dt_rank, self.d_state
        w_u, b_u, w_z, b_z, w_x, w_out, b_out = carry.products
        like = piece_array_like(w_u.dtype)
        xp = x.to(w_u.dtype)  # a no-op for the layers' pieces, which arrive in the products' dtype
        u_raw = nn.functional.linear(xp, w_u, b_u)
        z = nn.functional.linear(xp, w_z, b_z)
        u, u_product = kernels.conv1d_silu_tokens(
            piece_array(u_raw), self.conv1d.weight.detach()[:, 0].numpy(), self.conv1d.bias.detach().numpy(),
            carry.history.numpy(), like)
        keep = self.d_conv - 1
        if keep:
            tail = u_raw[:, -keep:].float()  # the conv1d's next history, float32
            if tail.shape[1] < keep:
                tail = torch.cat([carry.history, tail], dim=1)[:, -keep:]
            carry.history = tail.contiguous()
        x_dbl = nn.functional.linear(piece_tensor(u_product), w_x).float().numpy()  # (B, T, r + 2N): dt_low, B, C
        y = kernels.scan_tokens(u, x_dbl[..., :r], carry.w_dt.numpy(), carry.a2.numpy(), x_dbl[..., r:r + n],
                                x_dbl[..., r + n:], self.D.detach().float().numpy(), piece_array(z),
                                self.dt_proj.bias.detach().float().numpy(), carry.state.numpy(), like)
        return nn.functional.linear(piece_tensor(y), w_out, b_out)


def piece_array_like(dtype: torch.dtype) -> np.ndarray | None:
    """The ``like`` argument of the token-major kernels for products in ``dtype``: an empty ``uint16`` array (bf16
    bits) for bfloat16, None (float32) otherwise."""
    return _BF16_LIKE if dtype == torch.bfloat16 else None


_BF16_LIKE = np.empty(0, dtype=np.uint16)


def piece_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array the token-major kernels read: bf16 as its ``uint16`` bits, else as is."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def piece_tensor(a: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`piece_array`: ``uint16`` arrays are bf16 bits."""
    return torch.from_numpy(a).view(torch.bfloat16) if a.dtype == np.uint16 else torch.from_numpy(a)


@dataclass
class PieceCarry:
    """State of a sequence between pieces in :meth:`Mamba.forward_piece`, token-major: the conv1d's last K - 1
    inputs (B, K - 1, d_inner), the scan's state (B, N, d_inner; updated in place by the kernel), and, computed
    once per sequence: A log2(e) (N, d_inner), dt_proj's weight transposed (r, d_inner), and in_proj's (u and z
    halves), x_proj's and out_proj's weights and biases in the projections' dtype (:func:`piece_product_dtype`)."""

    history: torch.Tensor
    state: torch.Tensor
    a2: torch.Tensor
    w_dt: torch.Tensor
    products: tuple[torch.Tensor | None, ...]


@lru_cache(maxsize=1)
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX), where oneDNN runs bf16 matrix
    products 2-3.5x faster than float32 ones (2-core EPYC: (4096, 256) x (256, 1024) 9.8 -> 2.8 ms)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def piece_product_dtype() -> torch.dtype:
    """The dtype of the CPU piece path's projections: bfloat16 where the CPU multiplies it natively (the
    shipped models were trained with bf16 products under autocast), float32 elsewhere or with
    ``MEDMAMBA_CPU_BF16=0`` or inside :func:`float32_products`. The products' inputs and outputs are rounded to it
    (they accumulate in float32); every other step (norms, conv1d, scan, skip) stays float32."""
    if getattr(_FLOAT32_PRODUCTS, "depth", 0) or os.environ.get(CPU_BF16_ENV) == "0" or not cpu_multiplies_bf16():
        return torch.float32
    return torch.bfloat16


@contextmanager
def float32_products() -> Iterator[None]:
    """Inside, in this thread: :func:`piece_product_dtype` is float32 on every CPU (``segment(precision="fp32")``)."""
    _FLOAT32_PRODUCTS.depth = getattr(_FLOAT32_PRODUCTS, "depth", 0) + 1
    try:
        yield
    finally:
        _FLOAT32_PRODUCTS.depth -= 1


def _no_autocast(device: torch.device):
    """Autocast switched off on ``device`` (a no-op context where autocast does not exist, e.g. 'meta')."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


def _channel_mix(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` (O, I) times each (I, L) of ``x`` (B, I, L): a contiguous (B, O, L).

    Explicit mm / bmm: ``torch.matmul`` would return a transposed view here, which the next op then copies.
    """
    if x.shape[1] <= _NARROW_MAX:
        kernels = cpu_layer_kernels(x, weight)
        if kernels is not None:  # CPU float32 inference: a narrow input (dt_proj) is faster as one numba pass
            return torch.from_numpy(kernels.channel_mix_narrow(weight.detach().numpy(), x.numpy()))
        ops = _triton_layers(x) if torch.is_grad_enabled() and weight.requires_grad else None
        if ops is not None:  # CUDA training: cuBLAS's weight gradient for a rank-2..8 input is slow
            return ops.narrow_channel_mix(weight, x)
    if x.shape[0] == 1:
        return torch.mm(weight, x[0]).unsqueeze(0)
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def channels_first_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied along dim 1 of (B, in_features, L): (B, out_features, L), one matrix product."""
    y = _channel_mix(linear.weight, x)
    return y if linear.bias is None else y + linear.bias.to(y.dtype)[:, None]


def cpu_inference(*tensors: torch.Tensor) -> bool:
    """True when ``tensors`` are on the CPU, no autograd graph is being recorded for them and the fast CPU
    inference paths are not switched off (``CPU_LAYERS_ENV``)."""
    return (os.environ.get(CPU_LAYERS_ENV) != "0" and all(t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on (``torch.is_autocast_enabled("cpu")``; torch < 2.4 spells it differently)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def cpu_streaming(*tensors: torch.Tensor) -> bool:
    """True when a Mamba layer may run piece by piece (:meth:`Mamba.forward_piece`): the numba layers apply
    (:func:`cpu_layer_kernels`), no CPU autocast is active (its bf16 products would feed the float32 kernels),
    the scan dispatch picks the numba CPU backend and no :func:`scan_override` is active (its calls must see
    whole sequences)."""
    if _OVERRIDE or _cpu_autocast() or cpu_layer_kernels(*tensors) is None:
        return False
    from ..ssm.dispatch import resolve_backend

    return resolve_backend(tensors[0].device) == "cpu"


def cpu_layer_kernels(*tensors: torch.Tensor):
    """The numba kernels of ``ssm._cpu_numba_layers`` when they apply to ``tensors``: :func:`cpu_inference`,
    float32, rows contiguous, numba importable; else None (the PyTorch path)."""
    if not cpu_inference(*tensors) or any(t.dtype != torch.float32 or t.stride(-1) != 1 for t in tensors):
        return None
    try:
        from ..ssm import _cpu_numba_layers
    except ImportError:  # numba missing: the PyTorch path (the CPU scan names what to install)
        return None
    return _cpu_numba_layers


def causal_conv1d_silu(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """SiLU(``conv``(x)) cut to x's length: Mamba's causal depthwise conv1d (``padding = K - 1``) on (B, C, L).

    CPU float32 inference runs one fused numba pass (7x faster than PyTorch's oneDNN conv at L = 89 600);
    CUDA runs one fused Triton kernel forward and one backward (``ssm.triton.conv1d``) where Triton is
    installed, unless ``TRITON_LAYERS_ENV`` is "0"; otherwise PyTorch's conv1d and SiLU.
    """
    kernels = cpu_layer_kernels(x, conv.weight)
    if kernels is not None and conv.bias is not None:
        return torch.from_numpy(kernels.conv1d_silu(x.numpy(), conv.weight.detach()[:, 0].contiguous().numpy(),
                                                    conv.bias.detach().numpy()))
    k = conv.kernel_size[0]
    ops = _triton_layers(x) if conv.bias is not None and not k & (k - 1) else None
    if ops is not None:
        return ops.causal_conv1d_silu_triton(x, conv.weight, conv.bias)
    return nn.functional.silu(conv(x)[..., : x.shape[-1]])


def _triton_layers(x: torch.Tensor):
    """A namespace with the Triton layer ops (``causal_conv1d_silu_triton``, ``channels_first_layer_norm_triton``,
    ``narrow_channel_mix``) when they apply to ``x``: a CUDA tensor of at most 32 bits, Triton able to run,
    ``TRITON_LAYERS_ENV`` not "0"; else None."""
    if not x.is_cuda or x.dtype == torch.float64 or os.environ.get(TRITON_LAYERS_ENV) == "0":
        return None
    return _load_triton_layers()


@lru_cache(maxsize=1)
def _load_triton_layers():
    """The Triton layer ops (imported once), or None where Triton cannot run."""
    from types import SimpleNamespace

    from ..ssm import triton as triton_ops

    if not triton_ops.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    from ..ssm.triton.channel_mix import narrow_channel_mix
    from ..ssm.triton.conv1d import causal_conv1d_silu_triton
    from ..ssm.triton.layer_norm import channels_first_layer_norm_triton

    return SimpleNamespace(causal_conv1d_silu_triton=causal_conv1d_silu_triton,
                           channels_first_layer_norm_triton=channels_first_layer_norm_triton,
                           narrow_channel_mix=narrow_channel_mix)


def channels_first_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (over the last dim of (B, L, C) tokens) applied to channels-first (B, C, L) tokens.

    Means over channels are matrix-vector products (a strided reduction over dim 1 is several times
    slower on a CPU), in two passes (mean, then the variance of the centred values). Computed in
    float32 at least (as LayerNorm runs under autocast); float64 stays float64. CUDA runs one Triton
    kernel each way (``ssm.triton.layer_norm``) where Triton is installed, unless ``TRITON_LAYERS_ENV`` is "0".
    """
    affine = norm.weight is not None and norm.bias is not None
    kernels = cpu_layer_kernels(x, norm.weight) if affine else None
    if kernels is not None:  # CPU float32 inference: one fused numba pass per block of tokens
        return torch.from_numpy(kernels.layer_norm_cf(x.numpy(), norm.weight.detach().numpy(),
                                                      norm.bias.detach().numpy(), float(norm.eps)))
    ops = _triton_layers(x) if affine else None
    if ops is not None:
        return ops.channels_first_layer_norm_triton(x, norm.weight, norm.bias, norm.eps)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    with _no_autocast(xf.device):  # matrix products in xf's dtype, not autocast's bf16
        avg = xf.new_full((1, xf.shape[1]), 1.0 / xf.shape[1])
        centred = xf - _channel_mix(avg, xf)
        y = centred * torch.rsqrt(_channel_mix(avg, centred * centred) + norm.eps)
        if norm.weight is not None:
            y = torch.addcmul(norm.bias.to(xf.dtype)[:, None], y, norm.weight.to(xf.dtype)[:, None])
    return y
