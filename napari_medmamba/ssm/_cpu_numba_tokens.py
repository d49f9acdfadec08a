"""Numba kernels for CPU inference of a Mamba layer on token-major pieces: (batch, T, channels) arrays.

A long sequence is processed piece by piece (``models.mamba.Mamba.forward_piece``), each piece small enough to
stay in the cache; token-major pieces make every channel projection a (T, in) x (in, out) matrix product, which
the BLAS runs at about 3x the rate of the channels-first (out, in) x (in, T) product on a 2-core EPYC.

* ``scan_tokens``: the gated selective scan (softplus(delta + bias), D skip, SiLU(z) gate) continuing from a
  carried state. Lanes are channels: for each step and state n, 16 channels update together, so the output
  y_t = sum_n C_t,n h_t,n is a plain multiply-add per lane, with no horizontal sum over the state as in the
  channels-first kernel (``_cpu_numba``); the decay exp(dt A) is 2^(dt A log2 e) with A given pre-scaled.
* ``conv1d_silu_tokens``: the causal depthwise conv1d (continuing from the previous piece's last K - 1 inputs)
  plus bias, then SiLU.

Arithmetic is float32. Where the Mamba layer's projections are bf16 products (``models.mamba.
piece_product_dtype``), the arrays that come from or go to a product are bf16, held as ``uint16`` bit patterns:
the kernels read them with :func:`as_float32` and write them with :func:`as_element` (round to nearest even, as
``torch.Tensor.to(torch.bfloat16)``), given ``like``: an array whose dtype (``uint16`` or float32) the output
takes (None: float32). That spares a cast pass over every product's input and output. Work is split over (batch,
block of ``LANES`` channels) or blocks of tokens. References: ``selective_scan_ref``, PyTorch's conv1d and
LayerNorm, compared in tests/test_models_cpu_layers.py.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# absolute, as in _cpu_numba (benchmarks load copies of these files outside the package)
from napari_medmamba.ssm._cpu_numba import (_float32_bits_as_int32, _int32_bits_as_float32, _stack_ptr, scan_exp,
                                            scan_exp2, scan_softplus)
from napari_medmamba.ssm._cpu_numba_layers import _block

__all__ = ["LANES", "as_element", "as_float32", "conv1d_silu_tokens", "layer_norm_to_tokens", "scan_tokens",
           "skip_layer_norm", "tokens_to_channels"]

#: channels updated together (one AVX-512 register of float32)
LANES = 16
#: the largest state size the stack buffers hold
MAX_STATE = 64
_STATE_BUFFER = 1024  # MAX_STATE * LANES values (a literal: the stack allocation's size is fixed when compiled)

_FASTMATH = {"nsz", "contract", "reassoc", "arcp", "afn"}


def as_float32(value):
    """An array element as float32: float32 as it is, bf16 bits (``uint16``) widened (exact)."""
    if isinstance(value, np.uint16):
        return np.array([int(value) << 16], dtype=np.uint32).view(np.float32)[0]
    return np.float32(value)


@overload(as_float32, inline="always")
def _as_float32_overload(value):
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:
        return lambda value: _int32_bits_as_float32(np.int32(value) << np.int32(16))
    return None


def as_element(value, like):
    """float32 ``value`` as an element of array ``like``: float32 as it is, bf16 bits (``uint16``) rounded to
    nearest even (``torch.Tensor.to(torch.bfloat16)`` for finite values)."""
    if like.dtype == np.uint16:
        bits = int(np.array([value], dtype=np.float32).view(np.uint32)[0])
        return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)
    return np.float32(value)


@overload(as_element, inline="always")
def _as_element_overload(value, like):
    if like.dtype == types.float32:
        return lambda value, like: np.float32(value)
    if like.dtype == types.uint16:
        def to_bf16_bits(value, like):
            bits = _float32_bits_as_int32(np.float32(value))
            return np.uint16((bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1))) >> np.int32(16))
        return to_bf16_bits
    return None


def _output_dtype(like):
    """The dtype of a kernel's output given ``like`` (None: float32)."""
    return np.float32 if like is None else like.dtype


@overload(_output_dtype, inline="always")
def _output_dtype_overload(like):
    if isinstance(like, (types.NoneType, types.Omitted)):
        return lambda like: np.float32
    return lambda like: like.dtype


def _second_output(out, like):
    """``out`` itself when ``like`` is None, else a new array of ``out``'s shape in ``like``'s dtype."""
    return out if like is None else np.empty(out.shape, dtype=like.dtype)


@overload(_second_output, inline="always")
def _second_output_overload(out, like):
    if isinstance(like, (types.NoneType, types.Omitted)):
        return lambda out, like: out
    return lambda out, like: np.empty(out.shape, dtype=like.dtype)


def _make_scan(n_const: int):
    """The scan kernel; ``n_const`` > 0 fixes the state size N at compile time (LLVM then unrolls the loop over
    the state and keeps the N x LANES state in vector registers), 0 reads it from ``a2``."""

    @njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
    def scan(u, dt_low, w_dt, a2, Bt, Ct, D, z, bias, state, like):  # pragma: no cover - compiled
        nb, length, nc = u.shape
        n_state = n_const if n_const > 0 else a2.shape[0]
        blocks = (nc + LANES - 1) // LANES
        padded = blocks * LANES
        zero = np.float32(0.0)
        # element-wise passes over contiguous rows (vectorised): step sizes and drives before, the gate after
        steps = np.zeros((nb, length, padded), dtype=np.float32)
        drives = np.zeros((nb, length, padded), dtype=np.float32)
        ys = np.empty((nb, length, padded), dtype=np.float32)
        rank = w_dt.shape[0]
        for row in prange(nb * length):
            b, t = row // length, row % length
            lr, ur, sr, vr = dt_low[b, t], u[b, t], steps[b, t], drives[b, t]
            for c in range(nc):
                sr[c] = bias[c]
            for k in range(rank):  # dt = dt_proj(dt_low): a rank-r channel mix
                lk, wk = lr[k], w_dt[k]
                for c in range(nc):
                    sr[c] += lk * wk[c]
            for c in range(nc):
                st = scan_softplus(sr[c])
                sr[c] = st
                vr[c] = st * ur[c]
        for item in prange(nb * blocks):
            b = item // blocks
            d0 = (item % blocks) * LANES
            w = min(LANES, nc - d0)
            h = numba.carray(_stack_ptr(zero, _STATE_BUFFER), (MAX_STATE, LANES))
            a = numba.carray(_stack_ptr(zero, _STATE_BUFFER), (MAX_STATE, LANES))
            acc = numba.carray(_stack_ptr(zero, 16), (LANES,))
            for n in range(n_state):
                for i in range(LANES):
                    h[n, i] = state[b, n, d0 + i] if i < w else zero
                    a[n, i] = a2[n, d0 + i] if i < w else zero
            for t in range(length):
                sr, vr = steps[b, t, d0:d0 + LANES], drives[b, t, d0:d0 + LANES]
                for i in range(LANES):
                    acc[i] = zero
                for n in range(n_state):
                    bn, cn = Bt[b, t, n], Ct[b, t, n]
                    for i in range(LANES):
                        hn = scan_exp2(sr[i] * a[n, i]) * h[n, i] + vr[i] * bn
                        h[n, i] = hn
                        acc[i] += hn * cn
                yr = ys[b, t, d0:d0 + LANES]
                for i in range(LANES):
                    yr[i] = acc[i]
            for n in range(n_state):
                for i in range(w):
                    state[b, n, d0 + i] = h[n, i]
        out = np.empty((nb, length, nc), dtype=_output_dtype(like))
        for row in prange(nb * length):
            b, t = row // length, row % length
            yr, ur, zr, orow = ys[b, t], u[b, t], z[b, t], out[b, t]
            for c in range(nc):
                g = as_float32(zr[c])
                orow[c] = as_element((yr[c] + D[c] * ur[c]) * g / (np.float32(1.0) + scan_exp(-g)), orow)
        return out

    return scan


_SCAN = {16: _make_scan(16), 0: _make_scan(0)}


def scan_tokens(u, dt_low, w_dt, a2, Bt, Ct, D, z, bias, state, like=None):
    """out[b, t, d] of Mamba's gated scan with delta = dt_low @ w_dt (its dt_proj, the bias added in the
    softplus); ``state`` (B, N, C) is read as the state before the piece and overwritten with the state after it.

    u: contiguous (B, T, C) float32; z: the same, float32 or bf16 bits; dt_low: (B, T, r), w_dt: (r, C); a2: (N, C),
    A * log2(e); Bt, Ct: (B, T, N); D, bias: (C,). dt_low, Bt and Ct may be column slices of one array (x_proj's
    output). N <= ``MAX_STATE``. The output has ``like``'s dtype (None: float32).
    """
    n_state = a2.shape[0]
    if n_state > MAX_STATE:
        raise ValueError(f"the token-major scan holds at most {MAX_STATE} states, got {n_state}")
    return _SCAN[16 if n_state == 16 else 0](u, dt_low, w_dt, a2, Bt, Ct, D, z, bias, state, like)


_ROWS = 64
"""Tokens per work item of the row-wise kernels below."""


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def conv1d_silu_tokens(x, weight, bias, history, like=None):  # pragma: no cover - compiled
    """SiLU(causal depthwise conv1d(x) + bias) on token-major x (B, T, C), float32 or bf16 bits; weight (C, K),
    bias (C,), history (B, K - 1, C) float32: the K - 1 inputs before x[:, 0] -> (out (B, T, C) float32, the same
    values in ``like``'s dtype: a second array, or ``out`` itself when ``like`` is None)."""
    nb, length, nc = x.shape
    k = weight.shape[1]
    wt = np.ascontiguousarray(weight.T)  # (K, C): tap j's weights contiguous over channels
    out = np.empty((nb, length, nc), dtype=np.float32)
    prod = _second_output(out, like)
    blocks = (length + _ROWS - 1) // _ROWS
    for item in prange(nb * blocks):
        b, r0, n = _block(item, blocks, length, _ROWS)
        for t in range(r0, r0 + n):
            orow = out[b, t]
            for c in range(nc):
                orow[c] = bias[c]
            for j in range(k):  # tap j reads x[t - (k - 1 - j)], from the history before the piece
                src = t - (k - 1 - j)
                wr = wt[j]
                if src >= 0:
                    xr = x[b, src]
                    for c in range(nc):
                        orow[c] += wr[c] * as_float32(xr[c])
                else:
                    hr = history[b, k - 1 + src]
                    for c in range(nc):
                        orow[c] += wr[c] * hr[c]
            for c in range(nc):
                v = orow[c]
                orow[c] = v / (np.float32(1.0) + scan_exp(-v))
            if like is not None:
                prow = prod[b, t]
                for c in range(nc):
                    prow[c] = as_element(orow[c], prow)
    return out, prod


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _normalise_row(src, dst, weight, bias, eps):
    """dst = LayerNorm(src) over one token's channels (mean, then the variance of the centred values)."""
    nc = src.shape[0]
    inv_c = np.float32(1.0 / nc)
    mean = np.float32(0.0)
    for c in range(nc):
        mean += src[c]
    mean *= inv_c
    var = np.float32(0.0)
    for c in range(nc):
        d = src[c] - mean
        var += d * d
    rstd = np.float32(1.0) / math.sqrt(var * inv_c + eps)
    for c in range(nc):
        dst[c] = as_element((src[c] - mean) * rstd * weight[c] + bias[c], dst)


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def layer_norm_to_tokens(x, t0, length, weight, bias, eps, like=None):  # pragma: no cover - compiled
    """The piece x[:, :, t0:t0 + length] of channels-first tokens x (B, C, L), token-major, and its LayerNorm
    over channels: (piece (B, T, C) float32, normed (B, T, C) in ``like``'s dtype)."""
    nb, nc, _ = x.shape
    piece = np.empty((nb, length, nc), dtype=np.float32)
    normed = np.empty((nb, length, nc), dtype=_output_dtype(like))
    blocks = (length + _ROWS - 1) // _ROWS
    for item in prange(nb * blocks):
        b, r0, n = _block(item, blocks, length, _ROWS)
        for c in range(nc):  # transpose a (C, rows) block
            xr = x[b, c, t0 + r0:t0 + r0 + n]
            for i in range(n):
                piece[b, r0 + i, c] = xr[i]
        for t in range(r0, r0 + n):
            _normalise_row(piece[b, t], normed[b, t], weight, bias, eps)
    return piece, normed


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def skip_layer_norm(y, x, scale, weight, bias, eps, like=None):  # pragma: no cover - compiled
    """LayerNorm(y + scale * x) over the channels of token-major (B, T, C) arrays (y float32 or bf16 bits, x
    float32) -> (B, T, C) in ``like``'s dtype."""
    nb, length, nc = y.shape
    out = np.empty((nb, length, nc), dtype=_output_dtype(like))
    blocks = (length + _ROWS - 1) // _ROWS
    for item in prange(nb * blocks):
        b, r0, n = _block(item, blocks, length, _ROWS)
        row = np.empty(nc, dtype=np.float32)
        for t in range(r0, r0 + n):
            yr, xr = y[b, t], x[b, t]
            for c in range(nc):
                row[c] = as_float32(yr[c]) + scale * xr[c]
            _normalise_row(row, out[b, t], weight, bias, eps)
    return out


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def tokens_to_channels(y, out, t0):  # pragma: no cover - compiled
    """Write token-major y (B, T, C), float32 or bf16 bits, into channels-first float32 out (B, C, L) at tokens
    t0..t0 + T (the layer's output projection back into its output map), widening bf16 on the way."""
    nb, length, nc = y.shape
    blocks = (length + _ROWS - 1) // _ROWS
    for item in prange(nb * blocks):
        b, r0, n = _block(item, blocks, length, _ROWS)
        for c in range(nc):
            orow = out[b, c, t0 + r0:t0 + r0 + n]
            for i in range(n):
                orow[i] = as_float32(y[b, r0 + i, c])
