"""Numba kernels for the selective scan on CPU: the pure recurrence, forward and backward.

Layouts (all C-contiguous, one float dtype): u, delta, z, out: (batch, dim, L); A: (dim, N);
Bt, Ct: (batch, G, L, N) (time-major so one step reads N adjacent values); D, delta_bias:
(dim,). Absent D / z / delta_bias are passed as empty arrays with a flag, so each dtype
compiles once. Per chunk and channel the kernels run vectorisable loops over time for the
element-wise parts (bias, softplus, D skip, SiLU gate and their gradients) around the
sequential recurrence h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t.

Work is split into items (batch, group, channel slice) run in parallel; an item walks the
sequence chunk by chunk and, inside a chunk, over its channels, so the chunk of B and C
stays in L1 while every channel of the slice uses it. float32 uses vectorisable
polynomial exp and log1p (about 1 ulp); float64 uses ``math`` (for tight tests).

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
            k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
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


def scan_log1p(y):
    """log(1 + y) for the kernels, y in [0, 1]: series in float32, ``math.log1p`` otherwise."""
    return math.log1p(y)


@overload(scan_log1p, inline="always")
def _scan_log1p_overload(y):
    if y == types.float32:

        def log1p_f32(y):
            # log(1 + y) = 2 atanh(s), s = y / (2 + y) in [0, 1/3]: odd series to s^15.
            s = y / (np.float32(2.0) + y)
            s2 = s * s
            p = np.float32(1.0 / 15.0)
            p = p * s2 + np.float32(1.0 / 13.0)
            p = p * s2 + np.float32(1.0 / 11.0)
            p = p * s2 + np.float32(1.0 / 9.0)
            p = p * s2 + np.float32(1.0 / 7.0)
            p = p * s2 + np.float32(1.0 / 5.0)
            p = p * s2 + np.float32(1.0 / 3.0)
            return np.float32(2.0) * s * (p * s2 + np.float32(1.0))

        return log1p_f32
    return lambda y: math.log1p(y)


def scan_softplus(x):
    """log(1 + exp(x)), computed as max(x, 0) + log1p(exp(-|x|))."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@overload(scan_softplus, inline="always")
def _scan_softplus_overload(x):
    if x == types.float32:
        return lambda x: max(x, np.float32(0.0)) + scan_log1p(scan_exp(-abs(x)))
    return lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def scan_sigmoid(x):
    """1 / (1 + exp(-x))."""
    return 1.0 / (1.0 + math.exp(-x))


@overload(scan_sigmoid, inline="always")
def _scan_sigmoid_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0) / (np.float32(1.0) + scan_exp(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


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


@njit(inline="always")
def _item_channels(item, groups, slices, per_group):
    """(batch, group, slice, first channel, end channel) of work item ``item``."""
    b = item // (groups * slices)
    g = (item // slices) % groups
    s = item % slices
    per_slice = (per_group + slices - 1) // slices
    d0 = g * per_group + s * per_slice
    d1 = min(d0 + per_slice, (g + 1) * per_group)
    return b, g, s, d0, d1


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _step_sizes(delta, b, d, t0, t1, bias, softplus, steps):
    """steps[j] = softplus?(delta[b, d, t0 + j] + bias) for the chunk [t0, t1)."""
    if softplus:
        for t in range(t0, t1):
            steps[t - t0] = scan_softplus(delta[b, d, t] + bias)
    else:
        for t in range(t0, t1):
            steps[t - t0] = delta[b, d, t] + bias


@njit(cache=True, parallel=True, fastmath=_FASTMATH, error_model="numpy")
def _forward_kernel(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, slices, chunk,
                    out, y_pre, checkpoints, last_state):  # pragma: no cover - compiled
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    has_d, has_z, has_bias = D.shape[0] > 0, z.shape[0] > 0, delta_bias.shape[0] > 0
    save_states, save_y = checkpoints.shape[2] > 0, y_pre.shape[0] > 0
    for item in prange(batch * groups * slices):
        b, g, s, d0, d1 = _item_channels(item, groups, slices, dim // groups)
        if d1 <= d0:
            continue
        h = np.zeros((d1 - d0, n_state), dtype=u.dtype)
        steps = np.empty(chunk, dtype=u.dtype)
        ys = np.empty(chunk, dtype=u.dtype)
        for t0 in range(0, length, chunk):
            t1 = min(t0 + chunk, length)
            for d in range(d0, d1):
                hd = h[d - d0]
                if save_states:
                    for n in range(n_state):
                        checkpoints[b, d, t0 // chunk, n] = hd[n]
                bias = delta_bias[d] if has_bias else _zero_like(u[b, d, t0])
                _step_sizes(delta, b, d, t0, t1, bias, softplus, steps)
                a_row = A[d]
                for t in range(t0, t1):
                    step = steps[t - t0]
                    drive = step * u[b, d, t]
                    acc = _zero_like(step)
                    for n in range(n_state):
                        hn = scan_exp(step * a_row[n]) * hd[n] + drive * Bt[b, g, t, n]
                        hd[n] = hn
                        acc += hn * Ct[b, g, t, n]
                    ys[t - t0] = acc
                if has_d:
                    skip = D[d]
                    for t in range(t0, t1):
                        ys[t - t0] += skip * u[b, d, t]
                if has_z:
                    if save_y:
                        for t in range(t0, t1):
                            y_pre[b, d, t] = ys[t - t0]
                    for t in range(t0, t1):
                        gate = z[b, d, t]
                        out[b, d, t] = ys[t - t0] * gate * scan_sigmoid(gate)
                else:
                    for t in range(t0, t1):
                        out[b, d, t] = ys[t - t0]
        for d in range(d0, d1):
            for n in range(n_state):
                last_state[b, d, n] = h[d - d0, n]


@njit(cache=True, parallel=True, fastmath=_FASTMATH, error_model="numpy")
def _backward_kernel(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, slices, chunk, y_pre, checkpoints,
                     dout, d_last, du, ddelta, dz, dA_part, dBt, dCt, dD_part, dbias_part):  # pragma: no cover
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    has_d, has_z, has_bias = D.shape[0] > 0, z.shape[0] > 0, delta_bias.shape[0] > 0
    n_chunks = checkpoints.shape[2]
    for item in prange(batch * groups * slices):
        b, g, s, d0, d1 = _item_channels(item, groups, slices, dim // groups)
        if d1 <= d0:
            continue
        adj = np.empty((d1 - d0, n_state), dtype=u.dtype)
        for d in range(d0, d1):
            for n in range(n_state):
                adj[d - d0, n] = d_last[b, d, n]
        steps = np.empty(chunk, dtype=u.dtype)
        dys = np.empty(chunk, dtype=u.dtype)
        states = np.empty((chunk + 1, n_state), dtype=u.dtype)  # states[j] = h before step t0 + j
        decays = np.empty((chunk, n_state), dtype=u.dtype)
        adjoints = np.empty((chunk, n_state), dtype=u.dtype)
        da_dt = np.empty((chunk, n_state), dtype=u.dtype)
        dA_acc = np.zeros((d1 - d0, n_state), dtype=u.dtype)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(t0 + chunk, length)
            for d in range(d0, d1):
                a_row = A[d]
                bias = delta_bias[d] if has_bias else _zero_like(u[b, d, t0])
                _step_sizes(delta, b, d, t0, t1, bias, softplus, steps)
                if has_z:  # out = y * silu(z): dy = dout * silu(z), dz = dout * y * silu'(z)
                    for t in range(t0, t1):
                        gate = z[b, d, t]
                        sig = scan_sigmoid(gate)
                        dys[t - t0] = dout[b, d, t] * gate * sig
                        dz[b, d, t] = dout[b, d, t] * y_pre[b, d, t] * sig * (1 + gate * (1 - sig))
                else:
                    for t in range(t0, t1):
                        dys[t - t0] = dout[b, d, t]
                if has_d:
                    acc = _zero_like(bias)
                    for t in range(t0, t1):
                        acc += dys[t - t0] * u[b, d, t]
                    dD_part[b, d] += acc
                for n in range(n_state):
                    states[0, n] = checkpoints[b, d, c, n]
                for t in range(t0, t1):  # recompute this chunk's states
                    j = t - t0
                    step = steps[j]
                    drive = step * u[b, d, t]
                    for n in range(n_state):
                        decay = scan_exp(step * a_row[n])
                        decays[j, n] = decay
                        states[j + 1, n] = decay * states[j, n] + drive * Bt[b, g, t, n]
                gd = adj[d - d0]
                for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, backwards in time
                    j = t - t0
                    dyt = dys[j]
                    for n in range(n_state):
                        gn = gd[n] + dyt * Ct[b, g, t, n]
                        adjoints[j, n] = gn
                        gd[n] = gn * decays[j, n]
                # Gradients of this chunk, independent over t. Separate loops, each writing one
                # array, so LLVM's alias checks stay few enough for it to vectorise them.
                for t in range(t0, t1):
                    j = t - t0
                    step = steps[j]
                    sum_gb = _zero_like(step)
                    sum_da = _zero_like(step)
                    for n in range(n_state):
                        gn = adjoints[j, n]
                        sum_gb += gn * Bt[b, g, t, n]
                        da = gn * states[j, n] * decays[j, n]  # dL/d(dt*A) at (t, n)
                        sum_da += da * a_row[n]
                        da_dt[j, n] = da * step
                    du[b, d, t] = step * sum_gb
                    ddelta[b, d, t] = u[b, d, t] * sum_gb + sum_da  # d step; chain rule below
                if has_d:
                    skip = D[d]
                    for t in range(t0, t1):
                        du[b, d, t] += skip * dys[t - t0]
                if softplus:
                    for t in range(t0, t1):
                        ddelta[b, d, t] *= scan_sigmoid(delta[b, d, t] + bias)
                if has_bias:
                    acc = _zero_like(bias)
                    for t in range(t0, t1):
                        acc += ddelta[b, d, t]
                    dbias_part[b, d] += acc
                acc_a = dA_acc[d - d0]
                for j in range(t1 - t0):
                    for n in range(n_state):
                        acc_a[n] += da_dt[j, n]
                for t in range(t0, t1):
                    dyt = dys[t - t0]
                    for n in range(n_state):
                        dCt[s, b, g, t, n] += dyt * states[t - t0 + 1, n]
                for t in range(t0, t1):
                    drive_grad = steps[t - t0] * u[b, d, t]
                    for n in range(n_state):
                        dBt[s, b, g, t, n] += adjoints[t - t0, n] * drive_grad
        for d in range(d0, d1):
            for n in range(n_state):
                dA_part[b, d, n] = dA_acc[d - d0, n]


def _empty(dtype):
    return np.empty(0, dtype=dtype)


def scan_forward(u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, slices: int, chunk: int,
                 need_backward: bool):
    """Run the forward kernel. D, z, delta_bias may be None.

    Returns (out, last_state, saved): ``saved`` is what ``scan_backward`` needs
    (the chunk-start states and, with z, the output before the gate), or None.
    """
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = -(-length // chunk) if need_backward else 0
    out = np.empty_like(u)
    y_pre = np.empty_like(u) if (need_backward and z is not None) else np.empty((0, 0, 0), u.dtype)
    checkpoints = np.empty((batch, dim, n_chunks, n_state), dtype=u.dtype)
    last_state = np.empty((batch, dim, n_state), dtype=u.dtype)
    none = _empty(u.dtype)
    _forward_kernel(u, delta, A, Bt, Ct, none if D is None else D, none.reshape(0, 0, 0) if z is None else z,
                    none if delta_bias is None else delta_bias, softplus, slices, chunk,
                    out, y_pre, checkpoints, last_state)
    return out, last_state, ((y_pre, checkpoints) if need_backward else None)


def scan_backward(u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, slices: int, chunk: int,
                  saved, dout, d_last):
    """Run the backward kernel; returns (du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias).

    dBt, dCt are summed over the channel slices (Bt's shape); dA, dD, ddelta_bias over batch;
    entries for absent D / z / delta_bias are None. ``d_last`` may be None.
    """
    y_pre, checkpoints = saved
    batch, dim, _ = u.shape
    dtype = u.dtype
    if d_last is None:
        d_last = np.zeros((batch, dim, A.shape[1]), dtype=dtype)
    du, ddelta = np.empty_like(u), np.empty_like(u)
    dz = np.empty_like(u) if z is not None else np.empty((0, 0, 0), dtype)
    dA_part = np.empty((batch,) + A.shape, dtype=dtype)
    dBt = np.zeros((slices,) + Bt.shape, dtype=dtype)
    dCt = np.zeros((slices,) + Ct.shape, dtype=dtype)
    dD_part = np.zeros((batch, dim), dtype=dtype)
    dbias_part = np.zeros((batch, dim), dtype=dtype)
    none = _empty(dtype)
    _backward_kernel(u, delta, A, Bt, Ct, none if D is None else D, none.reshape(0, 0, 0) if z is None else z,
                     none if delta_bias is None else delta_bias, softplus, slices, chunk, y_pre, checkpoints,
                     dout, d_last, du, ddelta, dz, dA_part, dBt, dCt, dD_part, dbias_part)
    return (du, ddelta, dA_part.sum(0), dBt.sum(0) if slices > 1 else dBt[0], dCt.sum(0) if slices > 1 else dCt[0],
            dD_part.sum(0) if D is not None else None, dz if z is not None else None,
            dbias_part.sum(0) if delta_bias is not None else None)
