"""Autograd wrapper shared by the CPU (numba) and chunked (PyTorch) selective scans.

A backend supplies a ``ScanCore``: forward and backward of the pure recurrence
h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t, in one float dtype, with B and C
time-major (batch, G, L, N). This module does everything around it, in PyTorch: dtype
conversion, delta_bias and softplus, the D skip term, the SiLU(z) gate, group bookkeeping,
and the gradients of those pieces. Inputs of any float dtype are computed in float32
(float64 for float64 ``u``); outputs come back in ``u``'s dtype, gradients in each input's.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = ["ScanCore", "run_scan"]


class ScanCore(Protocol):
    """Forward/backward of the bare recurrence; all tensors contiguous, one dtype."""

    def forward(self, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                Ct: torch.Tensor, need_backward: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return (y (batch, dim, L), last state (batch, dim, N), whatever backward needs)."""
        ...

    def backward(self, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                 Ct: torch.Tensor, saved: Any, dy: torch.Tensor, d_last: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (du, d dt, dA, dBt, dCt); dBt, dCt already summed over each group's channels."""
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


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(u)
        dim = u.shape[1]
        u_c = u.to(dtype).contiguous()
        x = delta.to(dtype)
        if delta_bias is not None:
            x = x + delta_bias.to(dtype)[None, :, None]
        dt = (F.softplus(x) if delta_softplus else x).contiguous()
        A_c = A.to(dtype).contiguous()
        Bt, Ct = _time_major(B, dtype), _time_major(C, dtype)
        groups_b, groups_c = Bt.shape[1], Ct.shape[1]
        if groups_b != groups_c:  # rare: different groupings, give every channel its own
            Bt, Ct = _expand_to_channels(Bt, dim), _expand_to_channels(Ct, dim)
        need_backward = any(ctx.needs_input_grad)
        y, last_state, saved = core.forward(u_c, dt, A_c, Bt, Ct, need_backward)
        D_c = D.to(dtype) if D is not None else None
        if D_c is not None:
            y = y + u_c * D_c[None, :, None]
        z_c = z.to(dtype) if z is not None else None
        out = y * F.silu(z_c) if z_c is not None else y
        if need_backward:
            ctx.core, ctx.saved = core, saved
            ctx.delta_softplus = delta_softplus
            ctx.groups = (groups_b, groups_c)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, u_c, x, dt, A_c, Bt, Ct,
                                  D_c, z_c, y if z_c is not None else None)
        out = out.to(u.dtype)
        if return_last_state:
            return out, last_state
        return out

    @staticmethod
    def backward(ctx, dout, d_last=None):
        (u, delta, A, B, C, D, z, delta_bias, u_c, x, dt, A_c, Bt, Ct, D_c, z_c, y) = ctx.saved_tensors
        dtype = u_c.dtype
        if dout is None:
            dout = torch.zeros_like(u_c)
        dout = dout.to(dtype)
        dz = None
        if z_c is not None:
            gate = torch.sigmoid(z_c)
            dz = dout * y * gate * (1 + z_c * (1 - gate))
            dy = dout * (z_c * gate)
        else:
            dy = dout
        dD = (dy * u_c).sum((0, 2)) if D_c is not None else None
        if d_last is not None:
            d_last = d_last.to(dtype).contiguous()
        du, ddt, dA, dBt, dCt = ctx.core.backward(u_c, dt, A_c, Bt, Ct, ctx.saved, dy.contiguous(), d_last)
        if D_c is not None:
            du = du + dy * D_c[None, :, None]
        dx = ddt * torch.sigmoid(x) if ctx.delta_softplus else ddt
        d_bias = dx.sum((0, 2)) if delta_bias is not None else None
        groups_b, groups_c = ctx.groups
        if dBt.shape[1] != groups_b:
            dBt = _reduce_to_groups(dBt, groups_b)
        if dCt.shape[1] != groups_c:
            dCt = _reduce_to_groups(dCt, groups_c)

        def cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (None, cast(du, u), cast(dx, delta), cast(dA, A), _to_input_layout(dBt, B),
                _to_input_layout(dCt, C), cast(dD, D), cast(dz, z), cast(d_bias, delta_bias), None, None)


def run_scan(core: ScanCore, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
             return_last_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with ``core`` doing the recurrence (inputs assumed validated)."""
    return _ScanFunction.apply(core, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                               bool(return_last_state))
