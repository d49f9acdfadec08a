"""Single-launch selective scan for short sequences: one program per (batch, channel block)
walks the sequence step by step with the (N, BLOCK_D) state in registers.

The chunked kernels (``forward.py``/``backward.py``) parallelise over the sequence, which
costs several launches and torch reductions per call; for short sequences that fixed host
cost dominates. Here a forward is ONE Triton launch (plus output allocation) and a backward
is ONE launch plus at most two small torch sums (dB/dC over channel blocks when a group has
more channels than one block; dA/dD/d_delta_bias over the batch when batch > 1) and dtype
casts where a parameter is not fp32.

Memory for the backward: the forward stores the state every ``K`` steps,
(batch, dim, ceil(L / K), N) fp32 (K = 32: N/K = 1/2 of an fp32 copy of u for N = 16);
the backward re-runs each K-step chunk into a per-program scratch buffer,
(programs, K + 1, BLOCK_N, BLOCK_D) fp32, then walks it in reverse.

Layout: the state tile is (BLOCK_N, BLOCK_D) with channels on the fast axis, so Triton's
default layout gives each thread whole columns (one channel, all n) and the sum over n for
y_t stays in-thread. Imports triton: import only after ``is_available()`` said yes.
Design notes: docs/triton_scan.md ("Short sequences").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fast_launch import launch
from .forward import _LN2, _LOG2E, _softplus
from .launch import _sm_count, next_pow2

__all__ = ["SHORT_L_MAX", "ShortConfig", "choose_short_config", "short_forward", "short_backward",
           "SHORT_KEYS"]

#: Sequences with L <= SHORT_L_MAX take this path (see docs/triton_scan.md): its cost is about
#: L x (latency of one step) per program, while the chunked path pays a fixed ~0.1 ms of launches.
#: Measured on an H200 (2026-11-26, both paths forced, same run): the short path wins at L <= 256
#: (e.g. (1,48,256,16) 0.099 vs 0.219 ms), ties at 512 and loses from L = 560 (0.150 vs 0.237 ms
#: is the last win; (1,256,1400,16) 0.39 vs 0.105 ms).
SHORT_L_MAX = 384

#: ``config=`` keys of the short path (``selective_scan_triton(..., config={...})``).
SHORT_KEYS = ("short_block_d", "short_num_warps", "short_ck")



@dataclass(frozen=True)
class ShortConfig:
    """block_d: channels per program (power of two); num_warps per program; ck: steps between
    the forward's saved states (the backward's recompute chunk)."""

    block_d: int
    num_warps: int
    ck: int


def choose_short_config(batch: int, dim: int, length: int, n_state: int, groups: int,
                        device: torch.device, **override) -> ShortConfig:
    """block_d up to 16 (a warp holds 16 channels x 2 halves of N = 16: no register spills
    on sm_90, where 32 channels per warp spill in the backward), halved down to 8 while that
    leaves fewer than ~2 programs per SM; one warp per 256 state elements (1 for N <= 16)."""
    dpg = dim // groups
    bd = override.get("short_block_d")
    if not bd:
        bd = min(16, next_pow2(dpg))
        target = 2 * _sm_count(device)
        while bd > 8 and batch * groups * -(-dpg // bd) < target:
            bd //= 2
    bn = next_pow2(n_state)
    nw = override.get("short_num_warps") or max(1, min(4, bd * bn // 256))
    ck = override.get("short_ck") or 32
    ck = max(1, min(int(ck), length))
    return ShortConfig(block_d=int(bd), num_warps=int(nw), ck=ck)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _block_indices(dim, N, dpg, nblk, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (batch b, group g, channel block j) of the grid (batch * G * nblk,), with
    its channel offsets / masks and the state offsets / masks."""
    pid = tl.program_id(0)
    G = dim // dpg
    j = pid % nblk
    g = (pid // nblk) % G
    b = pid // (nblk * G)
    offs_j = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_j < dpg
    offs_d = g * dpg + offs_j
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask2 = mask_n[:, None] & mask_d[None, :]
    return pid, G, j, b, g, offs_j, mask_d, offs_d, offs_n, mask_n, mask2


@triton.jit
def _channel_constants(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask2, s_Ad, s_An, s_D, s_bias,
                       HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A as an (N, BLOCK_D) fp32 tile scaled by log2 e, the delta bias and D of the block's channels."""
    A2 = tl.load(A_ptr + offs_d[None, :] * s_Ad + offs_n[:, None] * s_An, mask=mask2,
                 other=0.0).to(tl.float32) * _LOG2E
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)
    return A2, bias, Dv


@triton.jit
def _short_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ck_ptr, last_ptr,
    dim, L, N, dpg, nblk, K, n_ck,
    s_ub, s_ud, s_db, s_dd, s_Ad, s_An, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_zd,
    s_D, s_bias,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_CK: tl.constexpr, SAVE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sequential scan over t of one (batch, group, channel block); inputs of step t + 1 are
    loaded while step t computes. Writes y (out's dtype), the state before every K-th step
    (SAVE_CK, (batch, dim, n_ck, N) fp32) and the last state (SAVE_LAST, (batch, dim, N)).
    Grid: (batch * G * nblk,), nblk = cdiv(dpg, BLOCK_D)."""
    pid, G, j, b, g, offs_j, mask_d, offs_d, offs_n, mask_n, mask2 = _block_indices(
        dim, N, dpg, nblk, BLOCK_D, BLOCK_N)
    A2, bias, Dv = _channel_constants(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask2,
                                      s_Ad, s_An, s_D, s_bias, HAS_D, HAS_BIAS, BLOCK_D)
    u_p = u_ptr + b * s_ub + offs_d * s_ud
    d_p = delta_ptr + b * s_db + offs_d * s_dd
    z_p = z_ptr + b * s_zb + offs_d * s_zd
    B_p = B_ptr + b * s_Bb + g * s_Bg + offs_n * s_Bn
    C_p = C_ptr + b * s_Cb + g * s_Cg + offs_n * s_Cn
    o_p = out_ptr + (b * dim + offs_d) * L
    lane = (b * dim + offs_d)[None, :] * N + offs_n[:, None]
    h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # step 0's inputs (all masked off when L == 0)
    m0 = mask_d & (offs_j * 0 < L)  # (vector comparisons: L may be a specialised constant)
    m0n = mask_n & (offs_n * 0 < L)
    uu = tl.load(u_p, mask=m0, other=0.0).to(tl.float32)
    dr = tl.load(d_p, mask=m0, other=0.0).to(tl.float32)
    Bt = tl.load(B_p, mask=m0n, other=0.0).to(tl.float32)
    Ct = tl.load(C_p, mask=m0n, other=0.0).to(tl.float32)
    zt = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_Z:
        zt = tl.load(z_p, mask=m0, other=0.0).to(tl.float32)
    for t in range(0, L):
        if SAVE_CK:
            if t % K == 0:
                tl.store(ck_ptr + ((b * dim + offs_d)[None, :] * n_ck + t // K) * N
                         + offs_n[:, None], h, mask=mask2)
        # prefetch step t + 1
        mn = mask_d & (offs_j * 0 + t + 1 < L)
        mnn = mask_n & (offs_n * 0 + t + 1 < L)
        uu_n = tl.load(u_p + t + 1, mask=mn, other=0.0).to(tl.float32)
        dr_n = tl.load(d_p + t + 1, mask=mn, other=0.0).to(tl.float32)
        Bt_n = tl.load(B_p + t + 1, mask=mnn, other=0.0).to(tl.float32)
        Ct_n = tl.load(C_p + t + 1, mask=mnn, other=0.0).to(tl.float32)
        zt_n = zt
        if HAS_Z:
            zt_n = tl.load(z_p + t + 1, mask=mn, other=0.0).to(tl.float32)
        # step t
        raw = dr + bias
        dl = raw
        if SOFTPLUS:
            dl = _softplus(raw)
        h = tl.exp2(A2 * dl[None, :]) * h + (dl * uu)[None, :] * Bt[:, None]
        y = tl.sum(h * Ct[:, None], axis=0)
        if HAS_D:
            y += Dv * uu
        if HAS_Z:
            y = y * zt * tl.sigmoid(zt)
        tl.store(o_p + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        uu, dr, Bt, Ct, zt = uu_n, dr_n, Bt_n, Ct_n, zt_n
    if SAVE_LAST:
        tl.store(last_ptr + lane, h, mask=mask2)


@triton.jit
def _short_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ck_ptr, sc_ptr,
    du_ptr, ddelta_ptr, dz_ptr, par_ptr, dBC_ptr,
    dim, L, N, dpg, nblk, K, n_ck, c_off,
    s_ub, s_ud, s_db, s_dd, s_Ad, s_An, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_zd,
    s_D, s_bias, s_gb, s_gd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Reverse walk over the K-step chunks, last chunk first: re-run the chunk from its saved
    state into this program's scratch slots (slot k = state before step k), then walk it
    backwards with the adjoint G_t = C_t dy_t + a_{t+1} G_{t+1} in registers.

    Writes du, ddelta, dz (contiguous (batch, dim, L)); per batch row, dA, dD and
    d_delta_bias summed over L into par (batch, dim, N + 2) = [dA | dD | d_bias]; dB and dC
    summed over the block's channels into dBC (2, batch, G, nblk, N, L) (dC at c_off).
    Same grid as the forward."""
    pid, G, j, b, g, offs_j, mask_d, offs_d, offs_n, mask_n, mask2 = _block_indices(
        dim, N, dpg, nblk, BLOCK_D, BLOCK_N)
    A2, bias, Dv = _channel_constants(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask2,
                                      s_Ad, s_An, s_D, s_bias, HAS_D, HAS_BIAS, BLOCK_D)
    u_p = u_ptr + b * s_ub + offs_d * s_ud
    d_p = delta_ptr + b * s_db + offs_d * s_dd
    z_p = z_ptr + b * s_zb + offs_d * s_zd
    g_p = dout_ptr + b * s_gb + offs_d * s_gd
    B_p = B_ptr + b * s_Bb + g * s_Bg + offs_n * s_Bn
    C_p = C_ptr + b * s_Cb + g * s_Cg + offs_n * s_Cn
    o_p = (b * dim + offs_d) * L  # offsets into the contiguous du / ddelta / dz
    row = (((b * G + g) * nblk + j) * N + offs_n) * L
    sc = sc_ptr + pid * (K + 1) * (BLOCK_N * BLOCK_D) + offs_n[:, None] * BLOCK_D \
        + tl.arange(0, BLOCK_D)[None, :]
    carry = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # a_{t+1} G_{t+1}
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for ci in range(0, n_ck):
        c = n_ck - 1 - ci
        t0 = c * K
        nk = tl.minimum(K, L - t0)
        # recompute the chunk's states into the scratch slots
        h = tl.load(ck_ptr + ((b * dim + offs_d)[None, :] * n_ck + c) * N + offs_n[:, None],
                    mask=mask2, other=0.0)
        tl.store(sc, h)
        for k in range(0, nk):
            t = t0 + k
            uu = tl.load(u_p + t, mask=mask_d, other=0.0).to(tl.float32)
            raw = tl.load(d_p + t, mask=mask_d, other=0.0).to(tl.float32) + bias
            dl = raw
            if SOFTPLUS:
                dl = _softplus(raw)
            Bt = tl.load(B_p + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp2(A2 * dl[None, :]) * h + (dl * uu)[None, :] * Bt[:, None]
            tl.store(sc + (k + 1) * (BLOCK_N * BLOCK_D), h)
        tl.debug_barrier()
        # reverse walk; h is the state after step t
        for kk in range(0, nk):
            k = nk - 1 - kk
            t = t0 + k
            hp = tl.load(sc + k * (BLOCK_N * BLOCK_D))
            uu = tl.load(u_p + t, mask=mask_d, other=0.0).to(tl.float32)
            raw = tl.load(d_p + t, mask=mask_d, other=0.0).to(tl.float32) + bias
            go = tl.load(g_p + t, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + t, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_p + t, mask=mask_n, other=0.0).to(tl.float32)
            dl = raw
            if SOFTPLUS:
                dl = _softplus(raw)
            dy = go
            if HAS_Z:
                zt = tl.load(z_p + t, mask=mask_d, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[:, None], axis=0) + Dv * uu
                sz = tl.sigmoid(zt)
                tl.store(dz_ptr + o_p + t,
                         (go * y * sz * (1.0 + zt * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                         mask=mask_d)
                dy = go * zt * sz
            a = tl.exp2(A2 * dl[None, :])
            Gm = Ct[:, None] * dy[None, :] + carry
            gB = tl.sum(Gm * Bt[:, None], axis=0)
            ga = Gm * a * hp  # G_t * d h_t / d(log a_t)
            dA_acc += ga * dl[None, :]
            ddl = gB * uu + tl.sum(ga * A2, axis=0) * _LN2
            if SOFTPLUS:
                ddl = ddl * tl.sigmoid(raw)
            tl.store(du_ptr + o_p + t, (gB * dl + dy * Dv).to(du_ptr.dtype.element_ty),
                     mask=mask_d)
            tl.store(ddelta_ptr + o_p + t, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            dD_acc += dy * uu
            db_acc += ddl
            tl.store(dBC_ptr + row + t,
                     tl.sum(Gm * (dl * uu)[None, :], axis=1).to(dBC_ptr.dtype.element_ty),
                     mask=mask_n)
            tl.store(dBC_ptr + c_off + row + t,
                     tl.sum(h * dy[None, :], axis=1).to(dBC_ptr.dtype.element_ty), mask=mask_n)
            carry = a * Gm
            h = hp
        tl.debug_barrier()  # the next chunk overwrites the scratch slots
    prow = (b * dim + offs_d) * (N + 2)
    tl.store(par_ptr + prow[None, :] + offs_n[:, None], dA_acc, mask=mask2)
    if HAS_D:
        tl.store(par_ptr + prow + N, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(par_ptr + prow + N + 1, db_acc, mask=mask_d)


# ----------------------------------------------------------------------------- host side


def _bc(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, group, n) strides of B/C given as (b, N, L) or (b, G, N, L)."""
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _groups(x: torch.Tensor) -> int:
    return 1 if x.dim() == 3 else x.shape[1]


def short_supported(B: torch.Tensor, C: torch.Tensor) -> bool:
    """The short path needs B and C with the same number of groups (3D counts as one)."""
    return _groups(B) == _groups(C)


def short_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, save_ck: bool,
                  return_last: bool, **cfg_over):
    """One launch. Returns (out, last_state or None, checkpoints or None, ShortConfig)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = _groups(B)
    dpg = dim // groups
    cfg = choose_short_config(batch, dim, length, n_state, groups, u.device, **cfg_over)
    nblk = -(-dpg // cfg.block_d)
    n_ck = -(-length // cfg.ck)
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    ck = torch.empty(batch, dim, n_ck, n_state, **f32) if save_ck else out
    last = torch.empty(batch, dim, n_state, **f32) if return_last else out
    zz = z if z is not None else u
    Dp = D if D is not None else A
    bp = delta_bias if delta_bias is not None else A
    launch(_short_fwd_kernel, (batch * groups * nblk,),
        u, delta, A, B, C, Dp, zz, bp, out, ck, last,
        dim, length, n_state, dpg, nblk, cfg.ck, n_ck,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
        *_bc(B), *_bc(C), zz.stride(0), zz.stride(1), Dp.stride(0), bp.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, SAVE_CK=save_ck, SAVE_LAST=return_last,
        BLOCK_D=cfg.block_d, BLOCK_N=next_pow2(n_state), num_warps=cfg.num_warps)
    return out, (last if return_last else None), (ck if save_ck else None), cfg


def short_backward(dout, u, delta, A, B, C, D, z, delta_bias, softplus: bool,
                   ck: torch.Tensor, cfg: ShortConfig):
    """One launch (+ small sums, see the module docstring). Returns (du, ddelta, dA, dB, dC,
    dD, dz, d_delta_bias), None for absent inputs."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = _groups(B)
    dpg = dim // groups
    nblk = -(-dpg // cfg.block_d)
    n_ck = ck.shape[2]
    bn = next_pow2(n_state)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dev = u.device
    f32 = torch.float32
    grid = batch * groups * nblk
    sc = torch.empty(grid * (cfg.ck + 1) * bn * cfg.block_d, dtype=f32, device=dev)
    du = torch.empty(u.shape, dtype=u.dtype, device=dev)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=dev)
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev) if z is not None else du
    # partial sums, at most two torch reductions: over the batch for [dA | dD | d_bias],
    # over channel blocks for dB/dC (written in the final dtype when none is needed)
    par = torch.empty(batch, dim, n_state + 2, dtype=f32, device=dev)
    direct = nblk == 1 and B.dtype == C.dtype
    dBC = torch.empty(2, batch, groups, nblk, n_state, length,
                      dtype=B.dtype if direct else f32, device=dev)
    zz = z if z is not None else u
    Dp = D if D is not None else A
    bp = delta_bias if delta_bias is not None else A
    launch(_short_bwd_kernel, (grid,),
        u, delta, A, B, C, Dp, zz, bp, dout, ck, sc,
        du, ddelta, dz, par, dBC,
        dim, length, n_state, dpg, nblk, cfg.ck, n_ck, dBC[0].numel(),
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
        *_bc(B), *_bc(C), zz.stride(0), zz.stride(1), Dp.stride(0), bp.stride(0),
        dout.stride(0), dout.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, BLOCK_D=cfg.block_d, BLOCK_N=bn, num_warps=cfg.num_warps)
    par = par[0] if batch == 1 else par.sum(0)
    bc = dBC[:, :, :, 0] if nblk == 1 else dBC.sum(3)
    return (du, ddelta, par[:, :n_state].to(A.dtype), bc[0].to(B.dtype).view(B.shape),
            bc[1].to(C.dtype).view(C.shape),
            par[:, n_state].to(D.dtype) if D is not None else None,
            dz if z is not None else None,
            par[:, n_state + 1].to(delta_bias.dtype) if delta_bias is not None else None)
