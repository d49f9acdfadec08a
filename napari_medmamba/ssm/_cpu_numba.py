"""Numba kernels for the selective scan on CPU: the pure recurrence, forward and backward.

Layouts (all C-contiguous, one float dtype): u, dt, dy: (batch, dim, L); A: (dim, N);
Bt, Ct: (batch, G, L, N) (time-major so one step reads N adjacent values).
``dt`` is the final step size (bias and softplus already applied by the caller), and the
kernels see neither D nor z: they compute only y_t = C_t . h_t with
h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t.

Work is split into items (batch, group, channel slice) run in parallel; an item walks the
sequence chunk by chunk and, inside a chunk, over its channels, so the chunk of B and C
stays in L1 while every channel of the slice uses it. float32 uses a vectorisable
polynomial exp (about 1 ulp); float64 uses ``math.exp`` (for tight tests).

The backward recomputes the states of one chunk at a time from checkpoints saved by the
forward (the state at every chunk start: O(batch*dim*N*L/chunk) memory), then runs the
adjoint recurrence g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1} backwards through the chunk.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = ["CHUNK", "scan_forward", "scan_backward", "num_threads"]

#: time steps per checkpoint / recomputation chunk (chunk of B, C, states stays in L1)
CHUNK = 64

_FASTMATH = {"nsz", "contract", "reassoc", "arcp", "afn"}


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (LLVM bitcast; vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def scan_exp(x):
    """exp for the kernels: polynomial in float32, ``math.exp`` otherwise."""
    return math.exp(x)


@overload(scan_exp, inline="always")
def _scan_exp_overload(x):
    if x == types.float32:

        def exp_f32(x):
            # Cephes expf: x = k ln2 + f, |f| <= ln2/2; exp(x) = 2^k * poly(f).
            x = min(max(x, np.float32(-87.0)), np.float32(88.0))
            k = math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            f = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * f + np.float32(1.3981999507e-3)
            p = p * f + np.float32(8.3334519073e-3)
            p = p * f + np.float32(4.1665795894e-2)
            p = p * f + np.float32(1.6666665459e-1)
            p = p * f + np.float32(5.0000001201e-1)
            p = p * f * f + f + np.float32(1.0)
            return p * _int32_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))

        return exp_f32
    return lambda x: math.exp(x)


def _zero_like(x):
    """A zero of the same float type as ``x`` (keeps float32 sums in float32 inside numba)."""
    return 0.0


@overload(_zero_like, inline="always")
def _zero_like_overload(x):
    if x == types.float32:
        return lambda x: np.float32(0.0)
    return lambda x: 0.0


def num_threads() -> int:
    """Threads numba's parallel loops use."""
    return numba.get_num_threads()


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _forward_kernel(u, dt, A, Bt, Ct, y, checkpoints, last_state, slices, chunk):  # pragma: no cover - compiled
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    per_group = dim // groups
    per_slice = (per_group + slices - 1) // slices
    save = checkpoints.shape[2] > 0
    for item in prange(batch * groups * slices):
        b = item // (groups * slices)
        g = (item // slices) % groups
        s = item % slices
        d0 = g * per_group + s * per_slice
        d1 = min(d0 + per_slice, (g + 1) * per_group)
        if d1 <= d0:
            continue
        h = np.zeros((d1 - d0, n_state), dtype=u.dtype)
        for t0 in range(0, length, chunk):
            t1 = min(t0 + chunk, length)
            c = t0 // chunk
            for d in range(d0, d1):
                hd = h[d - d0]
                if save:
                    for n in range(n_state):
                        checkpoints[b, d, c, n] = hd[n]
                a_row = A[d]
                for t in range(t0, t1):
                    step = dt[b, d, t]
                    drive = step * u[b, d, t]
                    acc = _zero_like(step)
                    for n in range(n_state):
                        hn = scan_exp(step * a_row[n]) * hd[n] + drive * Bt[b, g, t, n]
                        hd[n] = hn
                        acc += hn * Ct[b, g, t, n]
                    y[b, d, t] = acc
        for d in range(d0, d1):
            for n in range(n_state):
                last_state[b, d, n] = h[d - d0, n]


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _backward_kernel(u, dt, A, Bt, Ct, dy, checkpoints, d_last, slices, chunk,
                     du, ddt, dA_part, dBt, dCt):  # pragma: no cover - compiled
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    per_group = dim // groups
    per_slice = (per_group + slices - 1) // slices
    n_chunks = checkpoints.shape[2]
    for item in prange(batch * groups * slices):
        b = item // (groups * slices)
        g = (item // slices) % groups
        s = item % slices
        d0 = g * per_group + s * per_slice
        d1 = min(d0 + per_slice, (g + 1) * per_group)
        if d1 <= d0:
            continue
        adj = np.empty((d1 - d0, n_state), dtype=u.dtype)
        for d in range(d0, d1):
            for n in range(n_state):
                adj[d - d0, n] = d_last[b, d, n]
        states = np.empty((chunk + 1, n_state), dtype=u.dtype)  # states[j] = h before step t0 + j
        decays = np.empty((chunk, n_state), dtype=u.dtype)
        adjoints = np.empty((chunk, n_state), dtype=u.dtype)
        da_dt = np.empty((chunk, n_state), dtype=u.dtype)
        dA_acc = np.zeros(n_state, dtype=u.dtype)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(t0 + chunk, length)
            for d in range(d0, d1):
                a_row = A[d]
                for n in range(n_state):
                    states[0, n] = checkpoints[b, d, c, n]
                    dA_acc[n] = 0.0
                for t in range(t0, t1):  # recompute this chunk's states
                    j = t - t0
                    step = dt[b, d, t]
                    drive = step * u[b, d, t]
                    for n in range(n_state):
                        decay = scan_exp(step * a_row[n])
                        decays[j, n] = decay
                        states[j + 1, n] = decay * states[j, n] + drive * Bt[b, g, t, n]
                gd = adj[d - d0]
                for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, backwards in time
                    j = t - t0
                    dyt = dy[b, d, t]
                    for n in range(n_state):
                        gn = gd[n] + dyt * Ct[b, g, t, n]
                        adjoints[j, n] = gn
                        gd[n] = gn * decays[j, n]
                # Gradients of this chunk, independent over t. Separate loops, each writing one
                # array, so LLVM's alias checks stay few enough for it to vectorise them.
                for t in range(t0, t1):
                    j = t - t0
                    step = dt[b, d, t]
                    sum_gb = _zero_like(step)
                    sum_da = _zero_like(step)
                    for n in range(n_state):
                        gn = adjoints[j, n]
                        sum_gb += gn * Bt[b, g, t, n]
                        da = gn * states[j, n] * decays[j, n]  # dL/d(dt*A) at (t, n)
                        sum_da += da * a_row[n]
                        da_dt[j, n] = da * step
                    du[b, d, t] = step * sum_gb
                    ddt[b, d, t] = u[b, d, t] * sum_gb + sum_da
                for j in range(t1 - t0):
                    for n in range(n_state):
                        dA_acc[n] += da_dt[j, n]
                for t in range(t0, t1):
                    dyt = dy[b, d, t]
                    for n in range(n_state):
                        dCt[s, b, g, t, n] += dyt * states[t - t0 + 1, n]
                for t in range(t0, t1):
                    drive_grad = dt[b, d, t] * u[b, d, t]
                    for n in range(n_state):
                        dBt[s, b, g, t, n] += adjoints[t - t0, n] * drive_grad
                for n in range(n_state):
                    dA_part[b, d, n] += dA_acc[n]


def scan_forward(u, dt, A, Bt, Ct, slices: int, chunk: int, save_checkpoints: bool):
    """Run the forward kernel; returns (y, checkpoints, last_state) as numpy arrays."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = -(-length // chunk) if save_checkpoints else 0
    y = np.empty_like(u)
    checkpoints = np.empty((batch, dim, n_chunks, n_state), dtype=u.dtype)
    last_state = np.empty((batch, dim, n_state), dtype=u.dtype)
    _forward_kernel(u, dt, A, Bt, Ct, y, checkpoints, last_state, slices, chunk)
    return y, checkpoints, last_state


def scan_backward(u, dt, A, Bt, Ct, dy, checkpoints, d_last, slices: int, chunk: int):
    """Run the backward kernel; returns (du, ddt, dA, dBt, dCt) for the pure recurrence.

    dBt, dCt come back summed over the channel slices (shape of Bt, Ct); dA summed over batch.
    """
    du = np.empty_like(u)
    ddt = np.empty_like(u)
    dA_part = np.zeros((u.shape[0],) + A.shape, dtype=u.dtype)
    dBt = np.zeros((slices,) + Bt.shape, dtype=u.dtype)
    dCt = np.zeros((slices,) + Ct.shape, dtype=u.dtype)
    _backward_kernel(u, dt, A, Bt, Ct, dy, checkpoints, d_last, slices, chunk, du, ddt, dA_part, dBt, dCt)
    return du, ddt, dA_part.sum(0), dBt.sum(0), dCt.sum(0)
