"""Mamba's causal depthwise conv1d with SiLU, fused, forward and backward in Triton.

``out[b, c, t] = silu(bias[c] + sum_k w[c, k] x[b, c, t - (K - 1) + k])`` with x = 0 before t = 0
(PyTorch's ``conv1d(padding=K - 1)`` cut to L, then SiLU). PyTorch runs this as a conv1d (whose
weight gradient is a slow generic kernel on CUDA), a slice and a SiLU, and keeps the conv's output
for SiLU's backward. Here one kernel does the forward and one the backward; the backward recomputes
the pre-activation from x, so only x is kept. Accumulation in fp32; outputs and dx in x's dtype.

Imports triton: import only after ``is_available()`` said yes (``napari_medmamba.ssm.triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import launch

__all__ = ["causal_conv1d_silu_triton"]

BLOCK_L = 256


@triton.jit
def _pre(x_base, w, bias, t, L, s_xc, offs_c, K: tl.constexpr, SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
         BLOCK_L: tl.constexpr):
    """Pre-activation at steps t + SHIFT for a (BLOCK_C, BLOCK_L) tile: bias + sum_k w_k x[t + SHIFT - (K-1) + k]."""
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32) + bias[:, None]
    for k in tl.static_range(K):
        ts = t + SHIFT - (K - 1) + k
        xv = tl.load(x_base + offs_c[:, None] * s_xc + ts[None, :], mask=((ts >= 0) & (ts < L))[None, :],
                     other=0.0).to(tl.float32)
        wk = tl.sum(tl.where(tl.arange(0, K)[None, :] == k, w, 0.0), axis=1)
        acc += wk[:, None] * xv
    return acc


@triton.jit
def _block_start(w_ptr, b_ptr, C, K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's (batch b, channels cc (clamped), their mask, steps t, fp32 weights (BLOCK_C, K), biases)."""
    ncb = tl.cdiv(C, BLOCK_C)
    b = tl.program_id(1) // ncb
    offs_c = (tl.program_id(1) % ncb) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    cc = tl.where(mask_c, offs_c, 0)
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    w = tl.load(w_ptr + cc[:, None] * K + tl.arange(0, K)[None, :]).to(tl.float32)
    bias = tl.load(b_ptr + cc).to(tl.float32)
    return b, cc, mask_c, t, w, bias


@triton.jit
def _conv1d_silu_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, L, s_xb, s_xc,
                            K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Grid: (cdiv(L, BLOCK_L), batch * cdiv(C, BLOCK_C)). out is contiguous (batch, C, L)."""
    b, cc, mask_c, t, w, bias = _block_start(w_ptr, b_ptr, C, K, BLOCK_C, BLOCK_L)
    pre = _pre(x_ptr + b * s_xb, w, bias, t, L, s_xc, cc, K, 0, BLOCK_C, BLOCK_L)
    y = pre * tl.sigmoid(pre)
    mask = mask_c[:, None] & (t < L)[None, :]
    tl.store(out_ptr + (b * C + cc[:, None]) * L + t[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1d_silu_bwd_kernel(x_ptr, w_ptr, b_ptr, g_ptr, dx_ptr, dwb_ptr, C, L, s_xb, s_xc, s_gb, s_gc,
                            K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx (contiguous (batch, C, L)) and per-program partial sums of [dw | dbias] ((batch * n_lblocks, C, K + 1)).

    dpre_t = g_t silu'(pre_t); dx_t = sum_k w_k dpre_{t + K - 1 - k}; dw_k = sum_t dpre_t x_{t - (K-1) + k}.
    The pre-activations at the K steps dx needs are recomputed from x. Grid as the forward's.
    """
    b, cc, mask_c, t, w, bias = _block_start(w_ptr, b_ptr, C, K, BLOCK_C, BLOCK_L)
    offs_k = tl.arange(0, K)
    x_base = x_ptr + b * s_xb
    dx = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    dw = tl.zeros([BLOCK_C, K], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):  # dpre at t + j feeds dx_t through w_{K-1-j}
        tj = t + j
        pre = _pre(x_base, w, bias, t, L, s_xc, cc, K, j, BLOCK_C, BLOCK_L)
        s = tl.sigmoid(pre)
        g = tl.load(g_ptr + b * s_gb + cc[:, None] * s_gc + tj[None, :], mask=(tj < L)[None, :],
                    other=0.0).to(tl.float32)
        dpre = g * s * (1.0 + pre * (1.0 - s))
        wk = tl.sum(tl.where(offs_k[None, :] == K - 1 - j, w, 0.0), axis=1)
        dx += wk[:, None] * dpre
        if j == 0:  # this program's own steps: the weight and bias gradients
            dpre0 = tl.where((t < L)[None, :], dpre, 0.0)
            db = tl.sum(dpre0, axis=1)
            for k in tl.static_range(K):
                ts = t - (K - 1) + k
                xv = tl.load(x_base + cc[:, None] * s_xc + ts[None, :], mask=((ts >= 0) & (ts < L))[None, :],
                             other=0.0).to(tl.float32)
                dw = tl.where(offs_k[None, :] == k, tl.sum(dpre0 * xv, axis=1)[:, None], dw)
    mask = mask_c[:, None] & (t < L)[None, :]
    tl.store(dx_ptr + (b * C + cc[:, None]) * L + t[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = (b * tl.num_programs(0) + tl.program_id(0)) * C + cc
    tl.store(dwb_ptr + part[:, None] * (K + 1) + offs_k[None, :], dw, mask=mask_c[:, None])
    tl.store(dwb_ptr + part * (K + 1) + K, db, mask=mask_c)


def _launch_shape(x: torch.Tensor, K: int) -> tuple[int, int, int]:
    """(BLOCK_C, number of L blocks, number of channel blocks)."""
    batch, channels, length = x.shape
    block_c = 4 if K <= 8 else 2
    return block_c, triton.cdiv(length, BLOCK_L), triton.cdiv(channels, block_c)


def _forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    batch, channels, length = x.shape
    K = w.shape[1]
    block_c, n_lb, n_cb = _launch_shape(x, K)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch(_conv1d_silu_fwd_kernel, (n_lb, batch * n_cb), x, w, bias, out, channels, length,
           x.stride(0), x.stride(1), K=K, BLOCK_C=block_c, BLOCK_L=BLOCK_L, num_warps=4)
    return out


class _CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w, bias)
        return _forward(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w, bias = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        batch, channels, length = x.shape
        K = w.shape[1]
        block_c, n_lb, n_cb = _launch_shape(x, K)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dwb = torch.empty(batch * n_lb, channels, K + 1, dtype=torch.float32, device=x.device)
        launch(_conv1d_silu_bwd_kernel, (n_lb, batch * n_cb),
            x, w, bias, grad, dx, dwb, channels, length, x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
            K=K, BLOCK_C=block_c, BLOCK_L=BLOCK_L, num_warps=4)
        dwb = dwb.sum(0)
        return dx, dwb[:, :K].to(w.dtype), dwb[:, K].to(bias.dtype)


def causal_conv1d_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU(causal depthwise conv1d) of x (batch, C, L; rows contiguous, any batch/channel strides) with
    ``weight`` (C, K) (K a power of two) and ``bias`` (C,); differentiable in all three. Returns a contiguous
    (batch, C, L) tensor in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    K = weight.shape[-1]
    if K & (K - 1):
        raise ValueError(f"the Triton conv1d needs a power-of-two kernel size, got {K}")
    weight = weight.reshape(weight.shape[0], K).contiguous()
    return _CausalConv1dSiLU.apply(x, weight, bias.contiguous())
