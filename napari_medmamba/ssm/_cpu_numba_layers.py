"""Numba kernels for the memory-bound steps around the selective scan of a Mamba layer, for CPU inference.

Each replaces several full passes of PyTorch element-wise operations over a (channels, L) token map with one
pass that keeps a block of time steps in cache:

* ``conv1d_silu``: the causal depthwise conv1d of width K (``padding=K-1``, first L outputs) plus bias, then
  SiLU; PyTorch's oneDNN path took 29 ms at (64, 89600) on a 2-core EPYC, shifted multiply-adds 8 ms.
* ``channel_mix_narrow``: ``weight @ x`` for a narrow input (Mamba's dt_proj from its rank-2 to 8 dt): one
  pass writing the output; the BLAS matrix product took 6.4 ms at (2 -> 64, 89600), this 1.5 ms.
* ``layer_norm_cf``: LayerNorm over the channels of channels-first tokens (``channels_first_layer_norm``):
  mean, variance of the centred values (two passes over a cached block, as the reference), scale and shift.
* ``depthwise_conv3d_3``: LightM-UNet's depthwise 3x3x3 convolution (zero padding 1) on a (B, C, D, H, W) map,
  plane by plane, each row a sum of 27 shifted rows; oneDNN reorders an NCDHW map before its depthwise kernel.
* ``group_norm_relu``: GroupNorm then ReLU on a (B, C, voxels) map (LightM-UNet's blocks): one pass for the
  per-channel sums, one writing the output, where PyTorch's GroupNorm and ReLU made four and a new tensor more.
* ``upsample2_add``: LightM-UNet's decoder step ``trilinear x2 upsampling (align_corners=False) + skip``, one
  pass writing each output row once, where PyTorch's upsampling (a slow CPU kernel) and the add made two.

Inputs are float32 (batch, channels, L) arrays whose rows are contiguous (a channel slice of a larger
tensor is fine); outputs are new C-contiguous arrays. Work is split over (batch, block of time steps).
References: ``napari_medmamba.models.mamba`` (PyTorch), compared in tests/test_cpu_layers.py.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# absolute, as in _cpu_numba (benchmarks load copies of these files outside the package)
from napari_medmamba.ssm._cpu_numba import scan_exp

__all__ = ["BLOCK", "channel_mix_narrow", "conv1d_silu", "depthwise_conv3d_3", "group_norm_relu", "layer_norm_cf",
           "upsample2_add"]

#: time steps per work item: a (64 channels x 512) float32 block is 128 KB, it stays in L2 between passes
BLOCK = 512

_FASTMATH = {"nsz", "contract", "reassoc", "arcp", "afn"}


@njit(inline="always")
def _block(item, blocks, length, size):
    """(batch, first time step, steps) of work item ``item`` when each sequence is cut into ``blocks`` blocks of
    ``size`` steps."""
    t0 = (item % blocks) * size
    return item // blocks, t0, min(t0 + size, length) - t0


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def conv1d_silu(x, weight, bias):
    """SiLU(causal depthwise conv1d(x) + bias): x (B, C, L), weight (C, K), bias (C,) -> (B, C, L)."""
    nb, nc, length = x.shape
    k = weight.shape[1]
    out = np.empty((nb, nc, length), dtype=np.float32)
    blocks = (length + BLOCK - 1) // BLOCK
    for item in prange(nb * blocks):
        b, t0, n = _block(item, blocks, length, BLOCK)
        acc = np.empty(BLOCK, dtype=np.float32)
        for c in range(nc):
            xr = x[b, c]
            w = weight[c]
            for i in range(n):
                acc[i] = bias[c]
            for j in range(k):  # tap j reads x[t - (k - 1 - j)]; taps before the sequence start read zeros
                lag = k - 1 - j
                first = max(0, lag - t0)
                xs = xr[t0 + first - lag:t0 + n - lag]
                wj = w[j]
                for i in range(n - first):
                    acc[first + i] += wj * xs[i]
            orow = out[b, c, t0:t0 + n]
            for i in range(n):
                a = acc[i]
                orow[i] = a / (np.float32(1.0) + scan_exp(-a))
    return out


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def layer_norm_cf(x, weight, bias, eps):
    """LayerNorm over dim 1 of x (B, C, L) with per-channel ``weight`` and ``bias`` (C,) -> (B, C, L)."""
    nb, nc, length = x.shape
    out = np.empty((nb, nc, length), dtype=np.float32)
    blocks = (length + BLOCK - 1) // BLOCK
    inv_c = np.float32(1.0 / nc)
    for item in prange(nb * blocks):
        b, t0, n = _block(item, blocks, length, BLOCK)
        mean = np.zeros(BLOCK, dtype=np.float32)
        var = np.zeros(BLOCK, dtype=np.float32)
        for c in range(nc):
            xr = x[b, c, t0:t0 + n]
            for i in range(n):
                mean[i] += xr[i]
        for i in range(n):
            mean[i] *= inv_c
        for c in range(nc):
            xr = x[b, c, t0:t0 + n]
            for i in range(n):
                d = xr[i] - mean[i]
                var[i] += d * d
        for i in range(n):
            var[i] = np.float32(1.0) / math.sqrt(var[i] * inv_c + eps)
        for c in range(nc):
            xr = x[b, c, t0:t0 + n]
            orow = out[b, c, t0:t0 + n]
            w = weight[c]
            s = bias[c]
            for i in range(n):
                orow[i] = (xr[i] - mean[i]) * var[i] * w + s
    return out


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def channel_mix_narrow(weight, x):
    """``weight`` (O, K) times each (K, L) of x (B, K, L) -> (B, O, L), for small K."""
    nb, nk, length = x.shape
    no = weight.shape[0]
    out = np.empty((nb, no, length), dtype=np.float32)
    blocks = (length + BLOCK - 1) // BLOCK
    for item in prange(nb * blocks):
        b, t0, n = _block(item, blocks, length, BLOCK)
        for o in range(no):
            orow = out[b, o, t0:t0 + n]
            w0 = weight[o, 0]
            x0 = x[b, 0, t0:t0 + n]
            for i in range(n):
                orow[i] = w0 * x0[i]
            for k in range(1, nk):
                wk = weight[o, k]
                xk = x[b, k, t0:t0 + n]
                for i in range(n):
                    orow[i] += wk * xk[i]
    return out


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def depthwise_conv3d_3(x, weight):  # pragma: no cover - compiled
    """Depthwise 3x3x3 convolution with zero padding 1, no bias: x (B, C, D, H, W), weight (C, 3, 3, 3) -> same
    shape as x."""
    nb, nc, nd, nh, nw = x.shape
    out = np.empty((nb, nc, nd, nh, nw), dtype=np.float32)
    for item in prange(nb * nc * nd):
        b = item // (nc * nd)
        c = (item // nd) % nc
        z = item % nd
        acc = np.empty(nw, dtype=np.float32)
        for y in range(nh):
            for i in range(nw):
                acc[i] = np.float32(0.0)
            for dz in range(3):
                zz = z + dz - 1
                if zz < 0 or zz >= nd:
                    continue
                for dy in range(3):
                    yy = y + dy - 1
                    if yy < 0 or yy >= nh:
                        continue
                    row = x[b, c, zz, yy]
                    w0, w1, w2 = weight[c, dz, dy, 0], weight[c, dz, dy, 1], weight[c, dz, dy, 2]
                    for i in range(nw):  # tap dx = 0
                        acc[i] += w1 * row[i]
                    for i in range(1, nw):  # dx = -1 reads the left neighbour
                        acc[i] += w0 * row[i - 1]
                    for i in range(nw - 1):  # dx = +1 the right one
                        acc[i] += w2 * row[i + 1]
            orow = out[b, c, z, y]
            for i in range(nw):
                orow[i] = acc[i]
    return out


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def group_norm_relu(x, groups, weight, bias, eps):  # pragma: no cover - compiled
    """ReLU(GroupNorm(x)): x (B, C, V) C-contiguous float32, ``groups`` dividing C, weight and bias (C,) -> a new
    (B, C, V). Moments from float64 sums of each channel row (the variance as E[x^2] - E[x]^2 in float64)."""
    nb, nc, nv = x.shape
    per = nc // groups
    s1 = np.zeros(nb * nc)
    s2 = np.zeros(nb * nc)
    for r in prange(nb * nc):
        row = x[r // nc, r % nc]
        a = 0.0
        q = 0.0
        for i in range(nv):
            v = np.float64(row[i])
            a += v
            q += v * v
        s1[r] = a
        s2[r] = q
    out = np.empty((nb, nc, nv), dtype=np.float32)
    count = per * nv
    for r in prange(nb * nc):
        b = r // nc
        c = r % nc
        first = b * nc + (c // per) * per
        a = 0.0
        q = 0.0
        for j in range(first, first + per):
            a += s1[j]
            q += s2[j]
        mean = a / count
        var = max(q / count - mean * mean, 0.0)
        scale = np.float32(weight[c] / math.sqrt(var + eps))
        shift = np.float32(bias[c] - mean * weight[c] / math.sqrt(var + eps))
        row = x[b, c]
        o = out[b, c]
        for i in range(nv):
            v = row[i] * scale + shift
            o[i] = v if v > 0.0 else np.float32(0.0)
    return out



@njit(inline="always")
def _up2_taps(o, n):
    """Source indices and weights of output index ``o`` of a linear x2 upsampling of ``n`` samples with
    ``align_corners=False`` (PyTorch's rule: source = (o + 0.5) / 2 - 0.5, clamped at 0, the upper neighbour
    clamped at n - 1): even o = 2i takes 0.25 x[i - 1] + 0.75 x[i], odd o = 2i + 1 takes 0.75 x[i] + 0.25 x[i + 1]."""
    i = o // 2
    if o % 2 == 0:
        if i == 0:
            return 0, 0, np.float32(1.0), np.float32(0.0)
        return i - 1, i, np.float32(0.25), np.float32(0.75)
    if i + 1 >= n:
        return i, i, np.float32(1.0), np.float32(0.0)
    return i, i + 1, np.float32(0.75), np.float32(0.25)


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def upsample2_add(x, skip):  # pragma: no cover - compiled
    """Trilinear x2 upsampling of x (B, C, D, H, W) with ``align_corners=False``, plus skip (B, C, 2D, 2H, 2W)
    -> a new (B, C, 2D, 2H, 2W) float32 array. Work items are output planes; each output row is blended from
    four source rows (z, then y) and spread along x in one pass."""
    nb, nc, nd, nh, nw = x.shape
    od, oh, ow = 2 * nd, 2 * nh, 2 * nw
    out = np.empty((nb, nc, od, oh, ow), dtype=np.float32)
    for item in prange(nb * nc * od):
        b = item // (nc * od)
        c = (item // od) % nc
        oz = item % od
        z0, z1, wz0, wz1 = _up2_taps(oz, nd)
        row = np.empty(nw + 2, dtype=np.float32)  # row[1:nw + 1] the blended source row, its ends repeated
        for oy in range(oh):
            y0, y1, wy0, wy1 = _up2_taps(oy, nh)
            r00, r01, r10, r11 = x[b, c, z0, y0], x[b, c, z0, y1], x[b, c, z1, y0], x[b, c, z1, y1]
            w00, w01, w10, w11 = wz0 * wy0, wz0 * wy1, wz1 * wy0, wz1 * wy1
            for i in range(nw):
                row[i + 1] = w00 * r00[i] + w01 * r01[i] + w10 * r10[i] + w11 * r11[i]
            row[0] = row[1]  # the clamped neighbours at both ends
            row[nw + 1] = row[nw]
            src = skip[b, c, oz, oy]
            dst = out[b, c, oz, oy]
            for i in range(nw):  # outputs 2i and 2i + 1 from source samples i - 1, i, i + 1
                dst[2 * i] = np.float32(0.25) * row[i] + np.float32(0.75) * row[i + 1] + src[2 * i]
                dst[2 * i + 1] = np.float32(0.75) * row[i + 1] + np.float32(0.25) * row[i + 2] + src[2 * i + 1]
    return out
