"""Autograd wrapper shared by the CPU (numba) and chunked (PyTorch) selective scans.

A backend supplies a ``ScanCore``: forward and backward of the whole scan (recurrence,
delta_bias, softplus, D skip, SiLU(z) gate) in one float dtype, with B and C time-major
(batch, G, L, N). This module does the rest: dtype conversion (inputs of any float dtype
compute in float32, float64 for float64 ``u``; outputs come back in ``u``'s dtype,
gradients in each input's), the B/C layout, group bookkeeping and the autograd plumbing.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["ScanCore", "run_scan"]

MaybeTensor = torch.Tensor | None


class ScanCore(Protocol):
    """Forward/backward of the scan on contiguous tensors of one dtype (D, z, delta_bias may be None)."""

    def forward(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                Ct: torch.Tensor, D: MaybeTensor, z: MaybeTensor, delta_bias: MaybeTensor, softplus: bool,
                need_backward: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return (out (batch, dim, L), last state (batch, dim, N), whatever backward needs)."""
        ...

    def backward(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                 Ct: torch.Tensor, D: MaybeTensor, z: MaybeTensor, delta_bias: MaybeTensor, softplus: bool,
                 saved: Any, dout: torch.Tensor, d_last: MaybeTensor) -> tuple[MaybeTensor, ...]:
        """Return (du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias); dBt, dCt summed per group."""
        ...


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _time_major(bc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> contiguous (batch, G, L, N) in ``dtype``."""
    if bc.dim() == 3:
        bc = bc.unsqueeze(1)
    return bc.to(dtype).transpose(-1, -2).contiguous()


def _expand_to_channels(bct: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, G, L, N) -> (batch, dim, L, N), channel d using group d // (dim // G)."""
    return bct.repeat_interleave(dim // bct.shape[1], dim=1).contiguous()


def _reduce_to_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``_expand_to_channels`` for gradients: sum the channels of each group."""
    batch, dim, length, n = grad.shape
    return grad.view(batch, groups, dim // groups, length, n).sum(2)


def _to_input_layout(grad_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Time-major gradient (batch, G, L, N) -> the layout and dtype of the input ``like``."""
    grad = grad_t.transpose(-1, -2)
    if like.dim() == 3:
        grad = grad.squeeze(1)
    return grad.to(like.dtype)


def _contiguous(t: MaybeTensor, dtype: torch.dtype) -> MaybeTensor:
    return None if t is None else t.to(dtype).contiguous()


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(u)
        dim = u.shape[1]
        u_c, delta_c, A_c = _contiguous(u, dtype), _contiguous(delta, dtype), _contiguous(A, dtype)
        D_c, z_c, bias_c = _contiguous(D, dtype), _contiguous(z, dtype), _contiguous(delta_bias, dtype)
        Bt, Ct = _time_major(B, dtype), _time_major(C, dtype)
        groups_b, groups_c = Bt.shape[1], Ct.shape[1]
        if groups_b != groups_c:  # rare: different groupings, give every channel its own
            Bt, Ct = _expand_to_channels(Bt, dim), _expand_to_channels(Ct, dim)
        need_backward = any(ctx.needs_input_grad)
        out, last_state, saved = core.forward(u_c, delta_c, A_c, Bt, Ct, D_c, z_c, bias_c,
                                              delta_softplus, need_backward)
        if need_backward:
            ctx.core, ctx.saved = core, saved
            ctx.delta_softplus = delta_softplus
            ctx.groups = (groups_b, groups_c)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias,
                                  u_c, delta_c, A_c, Bt, Ct, D_c, z_c, bias_c)
        out = out.to(u.dtype)
        if return_last_state:
            return out, last_state
        return out

    @staticmethod
    def backward(ctx, dout, d_last=None):
        (u, delta, A, B, C, D, z, delta_bias, *computed) = ctx.saved_tensors
        dtype = computed[0].dtype
        dout = torch.zeros_like(computed[0]) if dout is None else dout.to(dtype).contiguous()
        if d_last is not None:
            d_last = d_last.to(dtype).contiguous()
        du, ddelta, dA, dBt, dCt, dD, dz, d_bias = ctx.core.backward(
            *computed, ctx.delta_softplus, ctx.saved, dout, d_last)
        groups_b, groups_c = ctx.groups
        if dBt.shape[1] != groups_b:
            dBt = _reduce_to_groups(dBt, groups_b)
        if dCt.shape[1] != groups_c:
            dCt = _reduce_to_groups(dCt, groups_c)

        def cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (None, cast(du, u), cast(ddelta, delta), cast(dA, A), _to_input_layout(dBt, B),
                _to_input_layout(dCt, C), cast(dD, D), cast(dz, z), cast(d_bias, delta_bias), None, None)


def run_scan(core: ScanCore, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
             return_last_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with ``core`` doing the recurrence (inputs assumed validated)."""
    return _ScanFunction.apply(core, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                               bool(return_last_state))
