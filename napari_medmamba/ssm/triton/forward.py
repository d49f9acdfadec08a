"""Triton kernels of the chunked selective scan: forward passes and the cross-chunk state scan.

Imports triton at module level: import this module only after ``is_available()`` said yes.

Layouts (all contiguous, fp32 unless said): per-chunk tensors are (batch, dim, N, n_chunks)
flattened as ``((b * dim + d) * N + n) * n_chunks + c``; per-chunk delta sums are
(batch, dim, n_chunks). ``A`` is passed as fp32 and scaled by log2(e) where it is loaded, so
that ``exp2`` gives ``exp(delta * A)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # globals used in kernels must be constexpr
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _combine(a1, b1, a2, b2):
    """Compose two steps h -> a h + b (first (a1, b1), then (a2, b2))."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _col(h, offs_n, n):
    """Column n of a (BLOCK_D, BLOCK_N) tile."""
    return tl.sum(tl.where(offs_n[None, :] == n, h, 0.0), axis=1)


@triton.jit
def _set_col(h, offs_n, n, v):
    """The tile h with column n replaced by v."""
    return tl.where(offs_n[None, :] == n, v[:, None], h)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_delta(delta_ptr, offs_d, t, mask_t, bias, stride_d, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):
    """Load a (BLOCK_D, T) delta tile as fp32, add bias, softplus; 0 where t is out of range."""
    raw = tl.load(delta_ptr + offs_d[:, None] * stride_d + t[None, :], mask=mask_t[None, :],
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dl = raw
    if SOFTPLUS:
        dl = _softplus(raw)
    dl = tl.where(mask_t[None, :], dl, 0.0)
    return dl, raw


@triton.jit
def _chunk_state_col(h, n, A_ptr, B_base, offs_d, offs_n, N, s_Bn, t, mask_t, rem, dlu, tt):
    """Column n of the chunk-end state: h_n <- exp(A_n tt) h_n + sum_t exp(A_n (S_end - S_t)) dlu_t B_nt."""
    ok = (t * 0 + n) < N
    a2n = tl.load(A_ptr + offs_d * N + n, mask=(offs_d * 0 + n) < N, other=0.0) * _LOG2E
    Bn = tl.load(B_base + n * s_Bn + t, mask=mask_t & ok, other=0.0).to(tl.float32)
    contrib = tl.sum(tl.exp2(a2n[:, None] * rem) * dlu * Bn[None, :], axis=1)
    return _set_col(h, offs_n, n, tl.exp2(a2n * tt) * _col(h, offs_n, n) + contrib)


@triton.jit
def _scan_out_col(h, y, n, A_ptr, B_base, C_base, offs_d, offs_n, offs_t, N, s_Bn, s_Cn, t, mask_t, dl, dlu,
                  T: tl.constexpr):
    """State column n over one (BLOCK_D, T) tile: scan from h_n, add C_n h to y; returns (h with the tile's
    end state in column n, y)."""
    ok = (t * 0 + n) < N
    a2n = tl.load(A_ptr + offs_d * N + n, mask=(offs_d * 0 + n) < N, other=0.0) * _LOG2E
    Bn = tl.load(B_base + n * s_Bn + t, mask=mask_t & ok, other=0.0).to(tl.float32)
    Cn = tl.load(C_base + n * s_Cn + t, mask=mask_t & ok, other=0.0).to(tl.float32)
    a = tl.exp2(a2n[:, None] * dl)
    P, H = tl.associative_scan((a, dlu * Bn[None, :]), axis=1, combine_fn=_combine)
    hh = H + P * _col(h, offs_n, n)[:, None]
    y += hh * Cn[None, :]
    h = _set_col(h, offs_n, n, tl.sum(tl.where((offs_t == T - 1)[None, :], hh, 0.0), axis=1))
    return h, y


@triton.jit
def _chunk_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, hend_ptr, dsum_ptr,
    dim, L, N, dpg, chunk_len,
    s_ub, s_ud, s_db, s_dd, s_Bb, s_Bg, s_Bn,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr,
):
    """Pass 1: state at the end of each chunk starting from zero, and the chunk's delta sum.

    h_end = sum_t exp(A (S_end - S_t)) delta_t u_t B_t, with S the running delta sum, so no
    scan is needed here; (BLOCK_D, T) tiles, one state column n at a time.
    Grid: (n_chunks, batch * dim // BLOCK_D).
    """
    pid_c = tl.program_id(0)
    pid_bd = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    ndb = dim // BLOCK_D
    b = pid_bd // ndb
    d0 = (pid_bd % ndb) * BLOCK_D
    g = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    mask_n = offs_n < N
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    u_base = u_ptr + b * s_ub
    d_base = delta_ptr + b * s_db
    B_base = B_ptr + b * s_Bb + g * s_Bg
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    tot = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = pid_c * chunk_len
    n_tiles = tl.cdiv(tl.minimum(chunk_len, L - t0), T)
    for k in range(0, n_tiles):
        t = t0 + k * T + offs_t
        mask_t = t < L
        dl, _ = _load_delta(d_base, offs_d, t, mask_t, bias, s_dd, HAS_BIAS, SOFTPLUS)
        uu = tl.load(u_base + offs_d[:, None] * s_ud + t[None, :], mask=mask_t[None, :],
                     other=0.0).to(tl.float32)
        dlu = dl * uu
        tt = tl.sum(dl, axis=1)
        rem = tt[:, None] - tl.cumsum(dl, axis=1)
        if UNROLL:
            for n in tl.static_range(BLOCK_N):
                h = _chunk_state_col(h, n, A_ptr, B_base, offs_d, offs_n, N, s_Bn, t, mask_t, rem, dlu, tt)
        else:
            for n in range(0, N):
                h = _chunk_state_col(h, n, A_ptr, B_base, offs_d, offs_n, N, s_Bn, t, mask_t, rem, dlu, tt)
        tot += tt
    lane = (b * dim + offs_d)[:, None] * N + offs_n[None, :]
    tl.store(hend_ptr + lane * n_chunks + pid_c, h, mask=mask_n[None, :])
    tl.store(dsum_ptr + (b * dim + offs_d) * n_chunks + pid_c, tot)


@triton.jit
def _chunk_combine_kernel(
    x_ptr, dsum_ptr, A_ptr, out_ptr, n_lanes, dim, N, n_chunks,
    REVERSE: tl.constexpr, BLOCK_LANES: tl.constexpr, CB: tl.constexpr,
):
    """Pass 2: inclusive scan over chunks of s_c = exp(A dsum_c) s_{c-1} + x_c per (b, d, n).

    REVERSE runs from the last chunk to the first (the backward's adjoint carry).
    Processes CB chunks at a time with an associative scan. Grid: (cdiv(n_lanes, BLOCK_LANES),).
    """
    lanes = tl.program_id(0) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    mask_l = lanes < n_lanes
    bd = lanes // N
    d = bd % dim
    n = lanes % N
    A2 = tl.load(A_ptr + d * N + n, mask=mask_l, other=0.0) * _LOG2E
    idx = tl.arange(0, CB)
    carry = tl.zeros([BLOCK_LANES], dtype=tl.float32)
    for c0 in range(0, n_chunks, CB):
        i = c0 + idx
        mask = mask_l[:, None] & (i < n_chunks)[None, :]
        if REVERSE:
            c = n_chunks - 1 - i
        else:
            c = i
        x = tl.load(x_ptr + lanes[:, None] * n_chunks + c[None, :], mask=mask, other=0.0)
        ds = tl.load(dsum_ptr + bd[:, None] * n_chunks + c[None, :], mask=mask, other=0.0)
        a = tl.exp2(A2[:, None] * ds)
        P, H = tl.associative_scan((a, x), axis=1, combine_fn=_combine)
        res = H + P * carry[:, None]
        tl.store(out_ptr + lanes[:, None] * n_chunks + c[None, :], res, mask=mask)
        carry = tl.sum(tl.where((idx == CB - 1)[None, :], res, 0.0), axis=1)


@triton.jit
def _scan_out_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, send_ptr, out_ptr,
    hs_ptr, last_ptr, y_ptr,
    dim, L, N, dpg, chunk_len, n_tiles_total,
    s_ub, s_ud, s_db, s_dd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_zd, s_ob, s_od,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_CARRY: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_LAST: tl.constexpr, SAVE_Y: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr,
):
    """Pass 3: scan each chunk from its carried-in state and write gated y.

    (BLOCK_D, T) tiles; for each state column n an associative scan along T, y accumulated
    over n in registers; the state is carried between tiles in registers. With SAVE_STATES
    the state at every tile start is stored for the backward ((batch, dim, N, n_tiles_total)).
    With SAVE_Y (and z) the ungated y is also stored, contiguous (batch, dim, L), so that the
    backward need not scan again to get it. Grid: (n_chunks, batch * dim // BLOCK_D).
    """
    pid_c = tl.program_id(0)
    pid_bd = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    ndb = dim // BLOCK_D
    b = pid_bd // ndb
    d0 = (pid_bd % ndb) * BLOCK_D
    g = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    mask_n = offs_n < N
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(tl.float32)
    lane = (b * dim + offs_d)[:, None] * N + offs_n[None, :]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_CARRY:
        h = tl.load(send_ptr + lane * n_chunks + pid_c - 1,
                    mask=(mask_n & (offs_n * 0 + pid_c > 0))[None, :], other=0.0)
    u_base = u_ptr + b * s_ub
    d_base = delta_ptr + b * s_db
    B_base = B_ptr + b * s_Bb + g * s_Bg
    C_base = C_ptr + b * s_Cb + g * s_Cg
    t0 = pid_c * chunk_len
    n_tiles = tl.cdiv(tl.minimum(chunk_len, L - t0), T)
    for k in range(0, n_tiles):
        t = t0 + k * T + offs_t
        mask_t = t < L
        if SAVE_STATES:
            tl.store(hs_ptr + lane * n_tiles_total + t0 // T + k, h, mask=mask_n[None, :])
        dl, _ = _load_delta(d_base, offs_d, t, mask_t, bias, s_dd, HAS_BIAS, SOFTPLUS)
        uu = tl.load(u_base + offs_d[:, None] * s_ud + t[None, :], mask=mask_t[None, :],
                     other=0.0).to(tl.float32)
        dlu = dl * uu
        y = tl.zeros([BLOCK_D, T], dtype=tl.float32)
        if UNROLL:
            for n in tl.static_range(BLOCK_N):
                h, y = _scan_out_col(h, y, n, A_ptr, B_base, C_base, offs_d, offs_n, offs_t, N, s_Bn, s_Cn,
                                     t, mask_t, dl, dlu, T)
        else:
            for n in range(0, N):
                h, y = _scan_out_col(h, y, n, A_ptr, B_base, C_base, offs_d, offs_n, offs_t, N, s_Bn, s_Cn,
                                     t, mask_t, dl, dlu, T)
        if HAS_D:
            y += Dv[:, None] * uu
        if HAS_Z:
            if SAVE_Y:
                tl.store(y_ptr + (b * dim + offs_d[:, None]) * L + t[None, :], y.to(y_ptr.dtype.element_ty),
                         mask=mask_t[None, :])
            zz = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + t[None, :],
                         mask=mask_t[None, :], other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_ptr + b * s_ob + offs_d[:, None] * s_od + t[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask_t[None, :])
    if SAVE_LAST:
        tl.store(last_ptr + lane, h, mask=(mask_n & (offs_n * 0 + pid_c == n_chunks - 1))[None, :])

