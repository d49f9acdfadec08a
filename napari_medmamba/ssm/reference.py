"""Plain PyTorch selective scan: the readable definition and the test oracle.

Semantics and layouts follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
(real A only). Slow: a Python loop over the sequence. Autograd gives its gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "expand_groups"]


def expand_groups(bc: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, N, L) or grouped (B, G, N, L) -> (B, D, N, L), channel d using group d // (D // G)."""
    if bc.dim() == 3:
        return bc.unsqueeze(1).expand(bc.shape[0], dim, bc.shape[1], bc.shape[2])
    groups = bc.shape[1]
    return bc.repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y_t = C_t . h_t (+ D u_t), h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, gated by SiLU(z).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Computes in float32 (float64 if inputs are float64) and returns
    ``u.dtype``; with ``return_last_state`` also the final state (batch, dim, N) in float32/64.
    """
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    A = A.to(compute)
    Bx = expand_groups(B.to(compute), dim)
    Cx = expand_groups(C.to(compute), dim)
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[:, :, :, t]
        ys.append((state * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.to(compute)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype_in)
    return (out, state) if return_last_state else out
