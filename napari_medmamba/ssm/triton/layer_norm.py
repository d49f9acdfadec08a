"""LayerNorm over the channels of channels-first (batch, C, L) tokens, forward and backward in Triton.

The Mamba layers normalise each token over its C channels while the feature map stays (batch, C, L). In
PyTorch that is a mean and a variance as matrix-vector products plus four elementwise passes forward and
about twice as many backward. Here each way is one kernel over (C, BLOCK_L) tiles: the forward keeps the
per-token mean and 1/std ((batch, L) fp32, 1/C of the input); the backward writes dx and per-block partial
sums of the weight and bias gradients (one torch reduction finishes them). Statistics and the output are
fp32 (as LayerNorm under autocast); dx is in x's dtype.

Imports triton: import only after ``is_available()`` said yes (``napari_medmamba.ssm.triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import launch

__all__ = ["channels_first_layer_norm_triton"]


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, L, s_xb, s_xc, eps,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Grid: (cdiv(L, BLOCK_L), batch). y contiguous (batch, C, L) fp32; mean, rstd (batch, L) fp32."""
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (t < L)[None, :]
    x = tl.load(x_ptr + b * s_xb + offs_c[:, None] * s_xc + t[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[None, :] * w[:, None] + bias[:, None]
    tl.store(y_ptr + (b * C + offs_c[:, None]) * L + t[None, :], y, mask=mask)
    tl.store(mean_ptr + b * L + t, mean, mask=t < L)
    tl.store(rstd_ptr + b * L + t, rstd, mask=t < L)


@triton.jit
def _ln_bwd_kernel(x_ptr, w_ptr, g_ptr, mean_ptr, rstd_ptr, dx_ptr, dwb_ptr, C, L, s_xb, s_xc, s_gb, s_gc,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = rstd (g w - mean_c(g w) - xhat mean_c(g w xhat)); partial [dw | db] per program:
    (batch * n_lblocks, 2, C) fp32. Grid as the forward's."""
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    n_lb = tl.num_programs(0)
    offs_c = tl.arange(0, BLOCK_C)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_c = offs_c < C
    mask_t = t < L
    mask = mask_c[:, None] & mask_t[None, :]
    x = tl.load(x_ptr + b * s_xb + offs_c[:, None] * s_xc + t[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * s_gb + offs_c[:, None] * s_gc + t[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + b * L + t, mask=mask_t, other=0.0)
    rstd = tl.load(rstd_ptr + b * L + t, mask=mask_t, other=0.0)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    gw = g * w[:, None]
    c1 = tl.sum(gw * xhat, axis=0) / C
    c2 = tl.sum(gw, axis=0) / C
    dx = (gw - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
    tl.store(dx_ptr + (b * C + offs_c[:, None]) * L + t[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = (b * n_lb + pid_l) * 2 * C
    tl.store(dwb_ptr + part + offs_c, tl.sum(g * xhat, axis=1), mask=mask_c)
    tl.store(dwb_ptr + part + C + offs_c, tl.sum(g, axis=1), mask=mask_c)


def _blocks(channels: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_L, num_warps): about 4096 values per tile."""
    block_c = triton.next_power_of_2(channels)
    block_l = max(16, min(256, 4096 // block_c))
    return block_c, block_l, 4 if block_c * block_l <= 4096 else 8


class _ChannelsFirstLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        batch, channels, length = x.shape
        block_c, block_l, warps = _blocks(channels)
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        stats = torch.empty(2, batch, length, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(length, block_l), batch)
        launch(_ln_fwd_kernel, grid, x, weight, bias, y, stats[0], stats[1], channels, length, x.stride(0), x.stride(1),
               float(eps), BLOCK_C=block_c, BLOCK_L=block_l, num_warps=warps)
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, stats = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        batch, channels, length = x.shape
        block_c, block_l, warps = _blocks(channels)
        n_lb = triton.cdiv(length, block_l)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dwb = torch.empty(batch * n_lb, 2, channels, dtype=torch.float32, device=x.device)
        launch(_ln_bwd_kernel, (n_lb, batch), x, weight, grad, stats[0], stats[1], dx, dwb, channels, length,
               x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
               BLOCK_C=block_c, BLOCK_L=block_l, num_warps=warps)
        dwb = dwb.sum(0)
        return dx, dwb[0].to(weight.dtype), dwb[1].to(weight.dtype), None


def channels_first_layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                     eps: float) -> torch.Tensor:
    """LayerNorm of each token of x (batch, C, L; rows contiguous) over its C channels, with ``weight`` and
    ``bias`` (C,): a contiguous fp32 (batch, C, L). Differentiable in x, weight and bias."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _ChannelsFirstLayerNorm.apply(x, weight.contiguous(), bias.contiguous(), eps)
