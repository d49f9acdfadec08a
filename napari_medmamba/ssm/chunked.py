"""Pure-PyTorch chunked selective scan: runs on any device, the fallback when nothing compiled is.

The linear recurrence h_t = a_t h_{t-1} + x_t is split into chunks of ~sqrt(L) steps. All
chunks are scanned at once from a zero state (a Python loop over the chunk length,
vectorised over chunks), the chunk start states follow from a short loop over chunks, and
h_t = local_t + (prod of a within the chunk up to t) * start is fixed up in one pass. So a
sequence of length L costs ~2 sqrt(L) tensor ops instead of L.

Channels are processed in blocks so that the (batch, block, L, N) tensors stay below
``BLOCK_ELEMENTS``. Backward recomputes the states of a block (nothing but the inputs is kept
from the forward) and scans the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} backwards with the
same routine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._scan_autograd import run_scan

__all__ = ["selective_scan_torch", "linear_scan", "ChunkedScanCore", "BLOCK_ELEMENTS"]

#: largest number of elements of one (batch, channel block, L, N) working tensor
BLOCK_ELEMENTS = 1 << 23


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None,
                chunk: int | None = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t along dim -2 of (..., L, N) tensors, h_{-1} = h0 (or 0)."""
    *lead, length, n = a.shape
    chunk = chunk or max(1, math.isqrt(length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        a = torch.cat([a, a.new_ones(*lead, pad, n)], dim=-2)
        x = torch.cat([x, x.new_zeros(*lead, pad, n)], dim=-2)
    a = a.reshape(*lead, n_chunks, chunk, n)
    x = x.reshape(*lead, n_chunks, chunk, n)
    local = torch.empty_like(x)
    local[..., 0, :] = x[..., 0, :]
    for j in range(1, chunk):  # every chunk at once, from a zero start
        local[..., j, :] = torch.addcmul(x[..., j, :], a[..., j, :], local[..., j - 1, :])
    decay = torch.cumprod(a, dim=-2)
    starts = torch.empty_like(local[..., 0, :])
    carry = h0 if h0 is not None else torch.zeros_like(starts[..., 0, :])
    for c in range(n_chunks):  # chunk start states, one chunk after another
        starts[..., c, :] = carry
        carry = torch.addcmul(local[..., c, -1, :], decay[..., c, -1, :], carry)
    h = torch.addcmul(local, decay, starts.unsqueeze(-2))
    return h.reshape(*lead, n_chunks * chunk, n)[..., :length, :]


def _shift_left(a: torch.Tensor) -> torch.Tensor:
    """a_{t+1} along dim -2, with ones after the last step."""
    return torch.cat([a[..., 1:, :], torch.ones_like(a[..., :1, :])], dim=-2)


class ChunkedScanCore:
    """``ScanCore`` made of PyTorch tensor ops (any device)."""

    def __init__(self, block_elements: int = BLOCK_ELEMENTS, chunk: int | None = None):
        self.block_elements = block_elements
        self.chunk = chunk

    def _blocks(self, u: torch.Tensor, n: int):
        batch, dim, length = u.shape
        per_block = max(1, self.block_elements // max(1, batch * length * n))
        return [(d0, min(dim, d0 + per_block)) for d0 in range(0, dim, per_block)]

    @staticmethod
    def _block_inputs(u, dt, A, Bt, Ct, d0: int, d1: int):
        dim, groups = u.shape[1], Bt.shape[1]
        group_of = torch.arange(d0, d1, device=u.device) // (dim // groups)
        step = dt[:, d0:d1, :, None]
        decay = torch.exp(step * A[None, d0:d1, None, :])
        drive = (step * u[:, d0:d1, :, None])
        Bx = Bt.index_select(1, group_of)
        Cx = Ct.index_select(1, group_of)
        return group_of, decay, drive, Bx, Cx

    def _recurrence_forward(self, u, dt, A, Bt, Ct):
        batch, dim, length = u.shape
        n = A.shape[1]
        y = u.new_empty(batch, dim, length)
        last = u.new_zeros(batch, dim, n)
        for d0, d1 in self._blocks(u, n):
            _, decay, drive, Bx, Cx = self._block_inputs(u, dt, A, Bt, Ct, d0, d1)
            h = linear_scan(decay, drive * Bx, chunk=self.chunk)
            y[:, d0:d1] = (h * Cx).sum(-1)
            if length:
                last[:, d0:d1] = h[..., -1, :]
        return y, last

    def _recurrence_backward(self, u, dt, A, Bt, Ct, dy, d_last):
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dA = torch.zeros_like(A)
        dBt, dCt = torch.zeros_like(Bt), torch.zeros_like(Ct)
        n = A.shape[1]
        for d0, d1 in self._blocks(u, n):
            group_of, decay, drive, Bx, Cx = self._block_inputs(u, dt, A, Bt, Ct, d0, d1)
            h = linear_scan(decay, drive * Bx, chunk=self.chunk)
            h_prev = torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)
            dy_b = dy[:, d0:d1, :, None]
            h0 = d_last[:, d0:d1] if d_last is not None else None
            adj = linear_scan(_shift_left(decay).flip(-2), (dy_b * Cx).flip(-2), h0, self.chunk).flip(-2)
            dCt.index_add_(1, group_of, dy_b * h)
            dBt.index_add_(1, group_of, adj * drive)
            adj_b = (adj * Bx).sum(-1)
            d_logdecay = adj * h_prev * decay  # dL/d(dt*A)
            step = dt[:, d0:d1]
            du[:, d0:d1] = step * adj_b
            ddt[:, d0:d1] = u[:, d0:d1] * adj_b + (d_logdecay * A[None, d0:d1, None, :]).sum(-1)
            dA[d0:d1] = (d_logdecay * step[..., None]).sum((0, 2))
        return du, ddt, dA, dBt, dCt


    def forward(self, u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, need_backward: bool):
        x = delta + delta_bias[None, :, None] if delta_bias is not None else delta
        dt = F.softplus(x) if softplus else x
        y, last = self._recurrence_forward(u, dt.contiguous(), A, Bt, Ct)
        if D is not None:
            y = y + u * D[None, :, None]
        out = y * F.silu(z) if z is not None else y
        return out, last, (y if (need_backward and z is not None) else None)

    def backward(self, u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, saved, dout, d_last):
        x = delta + delta_bias[None, :, None] if delta_bias is not None else delta
        dt = F.softplus(x) if softplus else x
        dz = None
        if z is not None:
            gate = torch.sigmoid(z)
            dz = dout * saved * gate * (1 + z * (1 - gate))
            dy = dout * (z * gate)
        else:
            dy = dout
        du, ddt, dA, dBt, dCt = self._recurrence_backward(u, dt.contiguous(), A, Bt, Ct, dy.contiguous(), d_last)
        dD = None
        if D is not None:
            dD = (dy * u).sum((0, 2))
            du = du + dy * D[None, :, None]
        ddelta = ddt * torch.sigmoid(x) if softplus else ddt
        d_bias = ddelta.sum((0, 2)) if delta_bias is not None else None
        return du, ddelta, dA, dBt, dCt, dD, dz, d_bias


def selective_scan_torch(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False):
    """Selective scan in plain PyTorch, chunked (same contract as ``selective_scan_ref``)."""
    return run_scan(ChunkedScanCore(), u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
