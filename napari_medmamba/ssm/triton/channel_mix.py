"""Weight gradient of a narrow channel mix, ``W (O, I) @ x (batch, I, L)`` with few input channels, in Triton.

Mamba's dt_proj mixes a rank of 2-8 channels into d_inner channels over every token. Its weight gradient
``sum_b G_b x_b^T`` is a (O, I) matrix reduced over batch * L (2 x 2 097 152 tokens at LightM-UNet 3D's
full resolution). cuBLAS runs that product with I = 2 as its output width through a slow small-tile kernel
(14 ms per call on an H200 where one read of G takes 0.1 ms). Here one pass reads G and x once: each
program reduces a run of tokens to an (O, I) partial, and one torch sum finishes.

Imports triton: import only after ``is_available()`` said yes (``napari_medmamba.ssm.triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import launch

__all__ = ["narrow_channel_mix"]

_TOKENS_PER_PROGRAM = 4096


@triton.jit
def _narrow_wgrad_kernel(g_ptr, x_ptr, part_ptr, O, I, L, s_gb, s_go, s_xb, s_xi, tokens,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr):
    """part[b * n_prog + p] = sum over this program's tokens of G[b, :, t] x[b, :, t]^T, (O, I) fp32.
    Grid: (cdiv(L, tokens), batch)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    n_prog = tl.num_programs(0)
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    mask_o = offs_o < O
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for start in range(pid * tokens, tl.minimum(pid * tokens + tokens, L), BLOCK_L):
        t = start + tl.arange(0, BLOCK_L)
        mask_t = t < L
        g = tl.load(g_ptr + b * s_gb + offs_o[:, None] * s_go + t[None, :], mask=mask_o[:, None] & mask_t[None, :],
                    other=0.0).to(tl.float32)
        for i in tl.static_range(BLOCK_I):
            xi = tl.load(x_ptr + b * s_xb + i * s_xi + t, mask=mask_t & ((t * 0 + i) < I),
                         other=0.0).to(tl.float32)
            acc = tl.where(offs_i[None, :] == i, acc + tl.sum(g * xi[None, :], axis=1)[:, None], acc)
    out = part_ptr + (b * n_prog + pid) * O * I
    tl.store(out + offs_o[:, None] * I + offs_i[None, :], acc, mask=mask_o[:, None] & (offs_i < I)[None, :])


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_b grad_b x_b^T, fp32 (O, I), for grad (batch, O, L) and x (batch, I, L), rows contiguous."""
    batch, out_ch, length = grad.shape
    in_ch = x.shape[1]
    block_o = triton.next_power_of_2(out_ch)
    block_l = max(16, min(256, 4096 // block_o))
    n_prog = triton.cdiv(length, _TOKENS_PER_PROGRAM)
    part = torch.empty(batch * n_prog, out_ch, in_ch, dtype=torch.float32, device=grad.device)
    launch(_narrow_wgrad_kernel, (n_prog, batch), grad, x, part, out_ch, in_ch, length,
           grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), _TOKENS_PER_PROGRAM,
           BLOCK_O=block_o, BLOCK_I=triton.next_power_of_2(in_ch), BLOCK_L=block_l, num_warps=4)
    return part.sum(0)


class _NarrowChannelMix(torch.autograd.Function):
    """``weight @ x`` per batch item; the weight gradient through :func:`_weight_grad`. Runs under the ambient
    autocast state, as ``torch.bmm`` would (``custom_fwd`` / ``custom_bwd``)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, weight, x):
        w = weight
        if torch.is_autocast_enabled("cuda"):
            w, x = w.to(torch.get_autocast_dtype("cuda")), x.to(torch.get_autocast_dtype("cuda"))
        elif w.dtype != x.dtype:
            w = w.to(x.dtype)
        ctx.save_for_backward(w, x)
        ctx.weight_dtype = weight.dtype
        return torch.bmm(w.expand(x.shape[0], -1, -1), x)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        w, x = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dx = torch.bmm(w.t().expand(grad.shape[0], -1, -1), grad) if ctx.needs_input_grad[1] else None
        dw = _weight_grad(grad, x).to(ctx.weight_dtype) if ctx.needs_input_grad[0] else None
        return dw, dx


def narrow_channel_mix(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` (O, I) times each (I, L) of ``x`` (batch, I, L; rows contiguous): a contiguous (batch, O, L),
    differentiable in both. Meant for a few input channels (the weight-gradient kernel unrolls over them); the
    caller decides how few (``models.mamba._NARROW_MAX``)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _NarrowChannelMix.apply(weight, x)
