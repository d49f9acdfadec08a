"""Triton kernels of the chunked selective-scan backward (the adjoint scan).

With g_t = dL/dh_t, x_t = C_t dy_t and a_t = exp(delta_t A): g_t = x_t + a_{t+1} g_{t+1}.
The backward works on tiles of T steps (the forward's tiles, whose start states the forward
stored): pass 1 gives each tile's adjoint seen from before its first step,
E = sum_t exp(A S_t) x_t (S the running delta sum from the tile start); pass 2 (the forward's
chunk-combine kernel, reversed) carries it from the right; pass 3 recomputes the states of
the tile, runs the reverse adjoint scan and writes every gradient.
Imports triton at module level: import only after ``is_available()`` said yes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import _combine, _load_delta

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _bwd_tile_adjoint_kernel(
    delta_ptr, A2_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, e_ptr, dsum_ptr,
    dim, L, N, dpg,
    s_db, s_dd, s_Cb, s_Cg, s_Cn, s_zb, s_zd, s_gb, s_gd,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    """Backward pass 1: per tile E = sum_t exp(A S_t) C_t dy_t and the tile's delta sum.

    Grid: (n_tiles, batch * dim // BLOCK_D).
    """
    pid_c = tl.program_id(0)
    pid_bd = tl.program_id(1)
    n_tiles = tl.num_programs(0)
    ndb = dim // BLOCK_D
    b = pid_bd // ndb
    d0 = (pid_bd % ndb) * BLOCK_D
    g = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = pid_c * T + tl.arange(0, T)
    mask_t = t < L
    A2 = tl.load(A2_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    dl, _ = _load_delta(delta_ptr + b * s_db, offs_d, t, mask_t, bias, s_dd, HAS_BIAS, SOFTPLUS)
    dy = tl.load(dout_ptr + b * s_gb + offs_d[:, None] * s_gd + t[None, :], mask=mask_t[None, :],
                 other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + t[None, :], mask=mask_t[None, :],
                     other=0.0).to(tl.float32)
        dy = dy * zz * tl.sigmoid(zz)
    Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + offs_n[:, None] * s_Cn + t[None, :],
                 mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(tl.float32)
    S = tl.cumsum(dl, axis=1)
    w = tl.exp2(A2[:, :, None] * S[:, None, :])
    E = tl.sum(w * Ct[None, :, :] * dy[:, None, :], axis=2)
    lane = (b * dim + offs_d)[:, None] * N + offs_n[None, :]
    tl.store(e_ptr + lane * n_tiles + pid_c, E, mask=mask_n[None, :])
    tl.store(dsum_ptr + (b * dim + offs_d) * n_tiles + pid_c, tl.sum(dl, axis=1))


@triton.jit
def _bwd_tile_grad_kernel(
    u_ptr, delta_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, hs_ptr, r_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, L, N, dpg, n_split,
    s_ub, s_ud, s_db, s_dd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_zd, s_gb, s_gd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, SUB: tl.constexpr,
):
    """Backward pass 3: recompute the tile's states, reverse adjoint scan, all gradients.

    A program covers one tile of T steps and dpg // n_split channels of one group, in SUB
    sub-blocks of BLOCK_D channels, so the dB/dC partial sums over channels stay in registers
    and are written once: (batch, n_split, G, N, L). dA, dD, d_bias partials are written per
    (batch, tile): (batch, n_tiles, dim, N) and (batch, n_tiles, dim).
    Grid: (n_tiles, batch * G * n_split).
    """
    pid_c = tl.program_id(0)
    pid_x = tl.program_id(1)
    n_tiles = tl.num_programs(0)
    G = dim // dpg
    s = pid_x % n_split
    bg = pid_x // n_split
    g = bg % G
    b = bg // G
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    t = pid_c * T + offs_t
    mask_t = t < L
    mask_nt = mask_n[:, None] & mask_t[None, :]
    # delta at t + 1 inside this tile (the last step's successor is the next tile's business)
    tn = t + 1
    mask_tn = (tn < L) & (offs_t < T - 1)
    Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + offs_n[:, None] * s_Bn + t[None, :], mask=mask_nt,
                 other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + offs_n[:, None] * s_Cn + t[None, :], mask=mask_nt,
                 other=0.0).to(tl.float32)
    dB_acc = tl.zeros([BLOCK_N, T], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_N, T], dtype=tl.float32)
    d_start = g * dpg + s * (SUB * BLOCK_D)
    for j in range(0, SUB):
        offs_d = d_start + j * BLOCK_D + tl.arange(0, BLOCK_D)
        A2 = tl.load(A2_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_n[None, :],
                     other=0.0)
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d).to(tl.float32)
        dl, raw = _load_delta(delta_ptr + b * s_db, offs_d, t, mask_t, bias, s_dd, HAS_BIAS,
                              SOFTPLUS)
        dln, _ = _load_delta(delta_ptr + b * s_db, offs_d, tn, mask_tn, bias, s_dd, HAS_BIAS,
                             SOFTPLUS)
        uu = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + t[None, :], mask=mask_t[None, :],
                     other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + b * s_gb + offs_d[:, None] * s_gd + t[None, :],
                       mask=mask_t[None, :], other=0.0).to(tl.float32)
        lane = (b * dim + offs_d)[:, None] * N + offs_n[None, :]
        h0 = tl.load(hs_ptr + lane * n_tiles + pid_c, mask=mask_n[None, :], other=0.0)
        gc = tl.load(r_ptr + lane * n_tiles + pid_c + 1, mask=(mask_n & (offs_n * 0 + pid_c + 1 < n_tiles))[None, :],
                     other=0.0)
        # forward recompute
        a = tl.exp2(A2[:, :, None] * dl[:, None, :])
        dlu = dl * uu
        bb = dlu[:, None, :] * Bt[None, :, :]
        P, H = tl.associative_scan((a, bb), axis=2, combine_fn=_combine)
        hh = H + P * h0[:, :, None]
        y = tl.sum(hh * Ct[None, :, :], axis=1)
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d).to(tl.float32)
            y += Dv[:, None] * uu
        dy = dout
        if HAS_Z:
            zz = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + t[None, :],
                         mask=mask_t[None, :], other=0.0).to(tl.float32)
            sz = tl.sigmoid(zz)
            dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
            dy = dout * zz * sz
            tl.store(dz_ptr + b * s_zb + offs_d[:, None] * s_zd + t[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=mask_t[None, :])
        # reverse adjoint scan: g_t = x_t + a_{t+1} g_{t+1}; the tile's right carry is gc
        alpha = tl.exp2(A2[:, :, None] * dln[:, None, :])
        x = Ct[None, :, :] * dy[:, None, :]
        Q, gl = tl.associative_scan((alpha, x), axis=2, combine_fn=_combine, reverse=True)
        gg = gl + Q * gc[:, :, None]
        gB = tl.sum(gg * Bt[None, :, :], axis=1)
        ga = gg * (hh - bb)  # g_t * a_t * h_{t-1}
        ddl = gB * uu + tl.sum(ga * A2[:, :, None], axis=1) * LN2
        du = gB * dl + dy * Dv[:, None]
        if SOFTPLUS:
            ddl = ddl * tl.sigmoid(raw)
        ddl = tl.where(mask_t[None, :], ddl, 0.0)
        tl.store(du_ptr + b * s_ub + offs_d[:, None] * s_ud + t[None, :],
                 du.to(du_ptr.dtype.element_ty), mask=mask_t[None, :])
        tl.store(ddelta_ptr + b * s_db + offs_d[:, None] * s_dd + t[None, :],
                 ddl.to(ddelta_ptr.dtype.element_ty), mask=mask_t[None, :])
        part = (b * n_tiles + pid_c) * dim + offs_d
        tl.store(dA_ptr + part[:, None] * N + offs_n[None, :], tl.sum(ga * dl[:, None, :], axis=2),
                 mask=mask_n[None, :])
        if HAS_D:
            tl.store(dD_ptr + part, tl.sum(dy * uu, axis=1))
        if HAS_BIAS:
            tl.store(dbias_ptr + part, tl.sum(ddl, axis=1))
        dB_acc += tl.sum(gg * dlu[:, None, :], axis=0)
        dC_acc += tl.sum(hh * dy[:, None, :], axis=0)
    row = ((b * n_split + s) * G + g) * N + offs_n
    tl.store(dB_ptr + row[:, None] * L + t[None, :], dB_acc, mask=mask_nt)
    tl.store(dC_ptr + row[:, None] * L + t[None, :], dC_acc, mask=mask_nt)
