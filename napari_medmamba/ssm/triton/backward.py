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

from .forward import _LN2, _LOG2E, _combine, _load_delta


@triton.jit
def _bwd_tile_adjoint_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, e_ptr, dsum_ptr,
    dim, L, N, dpg,
    s_db, s_dd, s_Cb, s_Cg, s_Cn, s_zb, s_zd, s_gb, s_gd,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr,
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
    t = pid_c * T + tl.arange(0, T)
    mask_t = t < L
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
    S = tl.cumsum(dl, axis=1)
    C_base = C_ptr + b * s_Cb + g * s_Cg
    lane = (b * dim + offs_d) * N
    for n in range(0, N):
        a2n = tl.load(A_ptr + offs_d * N + n) * _LOG2E
        Cn = tl.load(C_base + n * s_Cn + t, mask=mask_t, other=0.0).to(tl.float32)
        E = tl.sum(tl.exp2(a2n[:, None] * S) * dy * Cn[None, :], axis=1)
        tl.store(e_ptr + (lane + n) * n_tiles + pid_c, E)
    tl.store(dsum_ptr + (b * dim + offs_d) * n_tiles + pid_c, tl.sum(dl, axis=1))


@triton.jit
def _bwd_tile_grad_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, hs_ptr, r_ptr, y_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dp_ptr, dB_ptr, dC_ptr,
    dim, L, N, dpg, n_split,
    s_ub, s_ud, s_db, s_dd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_zd, s_gb, s_gd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr, SUB: tl.constexpr,
):
    """Backward pass 3: recompute the tile's states, reverse adjoint scan, all gradients.

    du, ddelta and dz are written contiguous (batch, dim, L); the inputs may have any batch/channel strides.

    A program covers one tile of T steps and dpg // n_split channels of one group, in SUB
    sub-blocks of BLOCK_D channels, one state column n at a time; its dB/dC partial sums over
    channels accumulate in program-private rows of (batch, n_split, G, N, L). The dA, dD and d_bias partials
    of each (batch, tile) share one buffer (batch, n_tiles, dim, N + 2): [dA | dD | d_bias]. With z, the
    ungated y comes from the forward (saved by :func:`scan_forward`), so dz needs no extra scan.
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
    offs_t = tl.arange(0, T)
    t = pid_c * T + offs_t
    mask_t = t < L
    tn = t + 1
    mask_tn = (tn < L) & (offs_t < T - 1)  # the last step's successor belongs to the next tile
    for j in range(0, SUB):
        offs_d = g * dpg + (s * SUB + j) * BLOCK_D + tl.arange(0, BLOCK_D)
        B_base = B_ptr + b * s_Bb + g * s_Bg
        C_base = C_ptr + b * s_Cb + g * s_Cg
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d).to(tl.float32)
        dl, raw = _load_delta(delta_ptr + b * s_db, offs_d, t, mask_t, bias, s_dd, HAS_BIAS, SOFTPLUS)
        dln, _ = _load_delta(delta_ptr + b * s_db, offs_d, tn, mask_tn, bias, s_dd, HAS_BIAS,
                             SOFTPLUS)
        uu = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + t[None, :], mask=mask_t[None, :],
                     other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + b * s_gb + offs_d[:, None] * s_gd + t[None, :],
                       mask=mask_t[None, :], other=0.0).to(tl.float32)
        dlu = dl * uu
        lane = (b * dim + offs_d) * N
        # du, ddelta and dz are contiguous (batch, dim, L) whatever the inputs' strides (u and z are often
        # channel slices of one in_proj output: their batch stride is not dim * L)
        o_g = (b * dim + offs_d[:, None]) * L + t[None, :]
        has_right = (offs_d * 0 + pid_c + 1) < n_tiles
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d).to(tl.float32)
        dy = dout
        if HAS_Z:  # the forward stored the ungated y (scan_forward with save_states)
            y = tl.load(y_ptr + o_g, mask=mask_t[None, :], other=0.0).to(tl.float32)
            zz = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + t[None, :],
                         mask=mask_t[None, :], other=0.0).to(tl.float32)
            sz = tl.sigmoid(zz)
            dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
            dy = dout * zz * sz
            tl.store(dz_ptr + o_g, dz.to(dz_ptr.dtype.element_ty), mask=mask_t[None, :])
        gB = tl.zeros([BLOCK_D, T], dtype=tl.float32)
        gaA = tl.zeros([BLOCK_D, T], dtype=tl.float32)
        part = (b * n_tiles + pid_c) * dim + offs_d
        row = ((b * n_split + s) * G + g) * N
        acc = mask_t & (offs_t * 0 + j > 0)
        for n in range(0, N):
            a2n = tl.load(A_ptr + offs_d * N + n) * _LOG2E
            Bn = tl.load(B_base + n * s_Bn + t, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_base + n * s_Cn + t, mask=mask_t, other=0.0).to(tl.float32)
            h0 = tl.load(hs_ptr + (lane + n) * n_tiles + pid_c)
            gc = tl.load(r_ptr + (lane + n) * n_tiles + pid_c + 1, mask=has_right, other=0.0)
            bb = dlu * Bn[None, :]
            P, H = tl.associative_scan((tl.exp2(a2n[:, None] * dl), bb), axis=1, combine_fn=_combine)
            hh = H + P * h0[:, None]
            # reverse adjoint scan: g_t = x_t + a_{t+1} g_{t+1}; the tile's right carry is gc
            Q, gl = tl.associative_scan((tl.exp2(a2n[:, None] * dln), dy * Cn[None, :]), axis=1,
                                        combine_fn=_combine, reverse=True)
            gg = gl + Q * gc[:, None]
            gB += gg * Bn[None, :]
            ga = gg * (hh - bb)  # g_t * a_t * h_{t-1}
            gaA += ga * a2n[:, None]
            tl.store(dp_ptr + part * (N + 2) + n, tl.sum(ga * dl, axis=1))
            # program-private partial rows, accumulated over the sub-blocks (stays in L1/L2)
            pB = dB_ptr + (row + n) * L + t
            pC = dC_ptr + (row + n) * L + t
            tl.store(pB, tl.sum(gg * dlu, axis=0) + tl.load(pB, mask=acc, other=0.0), mask=mask_t)
            tl.store(pC, tl.sum(hh * dy, axis=0) + tl.load(pC, mask=acc, other=0.0), mask=mask_t)
        ddl = gB * uu + gaA * _LN2
        du = gB * dl + dy * Dv[:, None]
        if SOFTPLUS:
            ddl = ddl * tl.sigmoid(raw)
        ddl = tl.where(mask_t[None, :], ddl, 0.0)
        tl.store(du_ptr + o_g, du.to(du_ptr.dtype.element_ty), mask=mask_t[None, :])
        tl.store(ddelta_ptr + o_g, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask_t[None, :])
        if HAS_D:
            tl.store(dp_ptr + part * (N + 2) + N, tl.sum(dy * uu, axis=1))
        if HAS_BIAS:
            tl.store(dp_ptr + part * (N + 2) + N + 1, tl.sum(ddl, axis=1))
        tl.debug_barrier()

