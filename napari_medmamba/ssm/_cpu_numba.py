"""Numba kernels for the selective scan on CPU: the pure recurrence, forward and backward.

Layouts (all C-contiguous, one float dtype): u, delta, z, out: (batch, dim, L); A: (dim, N);
Bt, Ct: (batch, G, L, N) (time-major so one step reads N adjacent values); D, delta_bias:
(dim,). Absent D / z / delta_bias are passed as empty arrays with a flag, so each dtype
compiles once per kernel pair: one pair with the state size N fixed at compile time for each
N in ``SPECIALISED_N`` (16, Mamba's default; LLVM then unrolls the loops over the state into
vector code) and one generic pair reading N at run time. Per chunk and channel the kernels run vectorisable loops over time for the
element-wise parts (bias, softplus, D skip, SiLU gate and their gradients) around the
sequential recurrence h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t.

Work is split into items (batch, group, channel slice) run in parallel; an item walks the
sequence chunk by chunk and, inside a chunk, over its channels, so the chunk of B and C
stays in L1 while every channel of the slice uses it. float32 uses vectorisable
polynomial exp and log1p (about 1 ulp); the decays exp(dt A) are computed as 2^(dt A log2 e) with A
rescaled once per channel and chunk (fewer instructions than exp's range reduction: the forward 11% faster
on 2 cores, relative error 2e-7); float64 uses ``math`` (for tight tests).

The backward recomputes the states of one chunk at a time from checkpoints saved by the
forward (the state at every chunk start: O(batch*dim*N*L/chunk) memory), then runs the
adjoint recurrence g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1} backwards through the chunk,
fused with the gradients of step t (du, ddelta, dB, dC, dA). It takes two channels at a time
(they share the loads of B and C and the updates of dB and dC, and their recurrences overlap),
and for the specialised N keeps its per-chunk buffers on the stack (``_stack_ptr``): LLVM then
knows they alias no input, so the loops over the state need no run-time overlap checks, which
otherwise ran once per time step. Loops inside a chunk index 1-d slices from 0 (and the reverse
loop uses unsigned indices), so numba's negative-index wrap-around folds away and the
element-wise loops (softplus, its slope, the gate) vectorise.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# absolute: benchmarks/scan_cpu_kernels.py --compare loads a copy of this file outside the package
from napari_medmamba.ssm import _large_arrays

__all__ = ["CHUNK", "scan_forward", "scan_backward", "num_threads"]

#: time steps per checkpoint / recomputation chunk (a chunk of B, C, states stays in L2; rows of
#: 1 KB per channel stream well from memory: 64 steps ran the backward about 10% slower)
CHUNK = 256
#: the largest chunk the backward's stack buffers hold (about 100 KB of stack for N = 16)
MAX_CHUNK = 256

_FASTMATH = {"nsz", "contract", "reassoc", "arcp", "afn"}


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (LLVM bitcast; vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _float32_bits_as_int32(typingctx, value):
    """Reinterpret the bits of a float32 as an int32 (LLVM bitcast; vectorises)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _stack_ptr(typingctx, like, size):
    """Pointer to ``size`` (a compile-time constant) values of ``like``'s type on the stack (entry block)."""
    if not isinstance(size, types.IntegerLiteral) or not isinstance(like, types.Float):
        return None
    sig = types.CPointer(like)(like, size)

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(like), size=size.literal_value)

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


def scan_exp2(x):
    """2**x for the kernels: polynomial in float32, ``math.exp(x ln 2)`` otherwise."""
    return math.exp(x * 0.6931471805599453)


@overload(scan_exp2, inline="always")
def _scan_exp2_overload(x):
    if x == types.float32:

        def exp2_f32(x):
            # x = k + f, |f| <= 1/2: 2^x = 2^k * poly(f), degree 5 (relative error 2e-7 in float32);
            # the clamp keeps 2^k a normal float.
            x = min(max(x, np.float32(-126.0)), np.float32(127.0))
            k = np.floor(x + np.float32(0.5))
            f = x - k
            p = np.float32(1.3264700e-3)
            p = p * f + np.float32(9.6715100e-3)
            p = p * f + np.float32(5.5507340e-2)
            p = p * f + np.float32(2.4022242e-1)
            p = p * f + np.float32(6.9314698e-1)
            p = p * f + np.float32(1.0)
            return p * _int32_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))

        return exp2_f32
    return lambda x: math.exp(x * 0.6931471805599453)


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


def _one_like(x):
    """A one of the same float type as ``x``."""
    return 1.0


@overload(_one_like, inline="always")
def _one_like_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0)
    return lambda x: 1.0


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
def _step_sizes(delta_c, count, bias, softplus, steps):
    """steps[j] = softplus?(delta_c[j] + bias) for j < count (``delta_c``: one chunk of a row)."""
    if softplus:
        for j in range(count):
            steps[j] = scan_softplus(delta_c[j] + bias)
    else:
        for j in range(count):
            steps[j] = delta_c[j] + bias


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _step_sizes_grad(delta_c, count, bias, softplus, steps, slopes):
    """``_step_sizes`` plus slopes[j] = d step / d delta (sigmoid, sharing softplus's exp)."""
    one = _one_like(bias)
    if softplus:
        for j in range(count):
            x = delta_c[j] + bias
            e = scan_exp(-abs(x))  # softplus = max(x, 0) + log1p(e), sigmoid = (x >= 0 ? 1 : e) / (1 + e)
            steps[j] = max(x, _zero_like(x)) + scan_log1p(e)
            slopes[j] = (one if x >= 0 else e) / (one + e)
    else:
        for j in range(count):
            steps[j] = delta_c[j] + bias
            slopes[j] = one


def _make_kernels(n_const: int):
    """(forward, backward) kernels; ``n_const`` > 0 fixes the state size N at compile time.

    With N a compile-time constant LLVM unrolls the per-step loops over the state and keeps
    them in vector registers (no per-row loop set-up); ``n_const`` = 0 reads N from ``A``.
    Inside a chunk the loops index 1-d slices from 0 so numba's negative-index wrap-around
    folds away and the element-wise loops vectorise.
    """

    @njit(cache=True, parallel=True, fastmath=_FASTMATH, error_model="numpy")
    def forward_kernel(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, slices, chunk,
                       out, y_pre, checkpoints, last_state):  # pragma: no cover - compiled
        batch, dim, length = u.shape
        n_state = n_const if n_const > 0 else A.shape[1]
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
            a2 = np.empty(n_state, dtype=u.dtype)  # the channel's A in log2 units: exp(step a) = 2^(step a2)
            log2e = _one_like(ys[0]) * 1.4426950408889634
            for t0 in range(0, length, chunk):
                t1 = min(t0 + chunk, length)
                count = t1 - t0
                B_c, C_c = Bt[b, g, t0:t1], Ct[b, g, t0:t1]
                for d in range(d0, d1):
                    hd = h[d - d0]
                    if save_states:
                        cp = checkpoints[b, d, t0 // chunk]
                        for n in range(n_state):
                            cp[n] = hd[n]
                    u_c, out_c = u[b, d, t0:t1], out[b, d, t0:t1]
                    bias = delta_bias[d] if has_bias else _zero_like(u_c[0])
                    _step_sizes(delta[b, d, t0:t1], count, bias, softplus, steps)
                    for n in range(n_state):
                        a2[n] = A[d, n] * log2e
                    for j in range(count):
                        step = steps[j]
                        drive = step * u_c[j]
                        acc = _zero_like(step)
                        for n in range(n_state):
                            hn = scan_exp2(step * a2[n]) * hd[n] + drive * B_c[j, n]
                            hd[n] = hn
                            acc += hn * C_c[j, n]
                        ys[j] = acc
                    if has_d:
                        skip = D[d]
                        for j in range(count):
                            ys[j] += skip * u_c[j]
                    if has_z:
                        z_c = z[b, d, t0:t1]
                        if save_y:
                            y_c = y_pre[b, d, t0:t1]
                            for j in range(count):
                                y_c[j] = ys[j]
                        for j in range(count):
                            gate = z_c[j]
                            out_c[j] = ys[j] * gate * scan_sigmoid(gate)
                    else:
                        for j in range(count):
                            out_c[j] = ys[j]
            for d in range(d0, d1):
                for n in range(n_state):
                    last_state[b, d, n] = h[d - d0, n]

    rows_len = (MAX_CHUNK + 1) * max(n_const, 1)
    state_len = max(n_const, 1)
    pair_rows_len = 2 * rows_len
    pair_state_len = 2 * state_len

    @njit(cache=True, parallel=True, fastmath=_FASTMATH, error_model="numpy")
    def backward_kernel(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, slices, chunk, y_pre, checkpoints,
                        dout, d_last, du, ddelta, dz, dA_part, dBt, dCt, dD_part, dbias_part):  # pragma: no cover
        batch, dim, length = u.shape
        n_state = n_const if n_const > 0 else A.shape[1]
        groups = Bt.shape[1]
        has_d, has_z, has_bias = D.shape[0] > 0, z.shape[0] > 0, delta_bias.shape[0] > 0
        has_last = d_last.shape[0] > 0
        n_chunks = checkpoints.shape[2]
        for item in prange(batch * groups * slices):
            b, g, s, d0, d1 = _item_channels(item, groups, slices, dim // groups)
            if d1 <= d0:
                continue
            adj = np.zeros((d1 - d0, n_state), dtype=u.dtype)
            if has_last:
                for d in range(d0, d1):
                    for n in range(n_state):
                        adj[d - d0, n] = d_last[b, d, n]
            zero = _zero_like(u[0, 0, 0])
            # Two channels at a time: they share the loads of B, C and the updates of dB, dC, and their
            # two recurrences overlap. Stack buffers: LLVM sees that they alias nothing (no run-time checks).
            if n_const > 0:
                states = numba.carray(_stack_ptr(zero, pair_rows_len), (2, MAX_CHUNK + 1, n_state))
                decays = numba.carray(_stack_ptr(zero, pair_rows_len), (2, MAX_CHUNK + 1, n_state))
                dB_loc = numba.carray(_stack_ptr(zero, rows_len), (MAX_CHUNK + 1, n_state))
                dC_loc = numba.carray(_stack_ptr(zero, rows_len), (MAX_CHUNK + 1, n_state))
                hcur = numba.carray(_stack_ptr(zero, pair_state_len), (2, n_state))
                gd = numba.carray(_stack_ptr(zero, pair_state_len), (2, n_state))
                acc_a = numba.carray(_stack_ptr(zero, pair_state_len), (2, n_state))
            else:
                states = np.empty((2, chunk + 1, n_state), dtype=u.dtype)
                decays = np.empty((2, chunk + 1, n_state), dtype=u.dtype)
                dB_loc = np.empty((chunk + 1, n_state), dtype=u.dtype)
                dC_loc = np.empty((chunk + 1, n_state), dtype=u.dtype)
                hcur = np.empty((2, n_state), dtype=u.dtype)
                gd = np.empty((2, n_state), dtype=u.dtype)
                acc_a = np.empty((2, n_state), dtype=u.dtype)
            steps = np.empty((2, chunk), dtype=u.dtype)
            slopes = np.empty((2, chunk), dtype=u.dtype)
            dys = np.empty((2, chunk), dtype=u.dtype)
            drives = np.empty((2, chunk), dtype=u.dtype)
            dA_acc = np.zeros((d1 - d0, n_state), dtype=u.dtype)
            a2 = np.empty((2, n_state), dtype=u.dtype)  # the pair's A in log2 units: exp(step a) = 2^(step a2)
            log2e = _one_like(zero) * 1.4426950408889634
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                t1 = min(t0 + chunk, length)
                count = t1 - t0
                B_c, C_c = Bt[b, g, t0:t1], Ct[b, g, t0:t1]
                dB_c, dC_c = dBt[s, b, g, t0:t1], dCt[s, b, g, t0:t1]
                for j in range(count):
                    for n in range(n_state):
                        dB_loc[j, n] = zero
                        dC_loc[j, n] = zero
                for dp in range(d0, d1, 2):
                    has_q = dp + 1 < d1  # odd channel count: the second of the last pair is a zero dummy
                    dq = dp + 1 if has_q else dp
                    for p in range(2):
                        d = dp + p if has_q else dp
                        real = p == 0 or has_q
                        u_c, dout_c = u[b, d, t0:t1], dout[b, d, t0:t1]
                        bias = delta_bias[d] if has_bias else zero
                        one = _one_like(bias)
                        steps_p, slopes_p, dys_p, drives_p = steps[p], slopes[p], dys[p], drives[p]
                        _step_sizes_grad(delta[b, d, t0:t1], count, bias, softplus, steps_p, slopes_p)
                        if not real:
                            for j in range(count):
                                dys_p[j] = zero
                        elif has_z:  # out = y * silu(z): dy = dout * silu(z), dz = dout * y * silu'(z)
                            z_c, y_c, dz_c = z[b, d, t0:t1], y_pre[b, d, t0:t1], dz[b, d, t0:t1]
                            for j in range(count):
                                gate = z_c[j]
                                sig = scan_sigmoid(gate)
                                dys_p[j] = dout_c[j] * gate * sig
                                dz_c[j] = dout_c[j] * y_c[j] * sig * (one + gate * (one - sig))
                        else:
                            for j in range(count):
                                dys_p[j] = dout_c[j]
                        if has_d and real:
                            acc = zero
                            for j in range(count):
                                acc += dys_p[j] * u_c[j]
                            dD_part[b, d] += acc
                        for j in range(count):
                            drives_p[j] = steps_p[j] * u_c[j]
                        cp = checkpoints[b, d, c]
                        for n in range(n_state):
                            states[p, 0, n] = cp[n]
                            hcur[p, n] = cp[n]
                            gd[p, n] = adj[d - d0, n] if real else zero
                            acc_a[p, n] = dA_acc[d - d0, n] if real else zero
                    a_p, a_q = A[dp], A[dq]
                    for n in range(n_state):
                        a2[0, n] = A[dp, n] * log2e
                        a2[1, n] = A[dq, n] * log2e
                    for j in range(count):  # recompute the chunk's states of both channels
                        step_p, step_q = steps[0, j], steps[1, j]
                        drive_p, drive_q = drives[0, j], drives[1, j]
                        for n in range(n_state):
                            decay_p = scan_exp2(step_p * a2[0, n])
                            decay_q = scan_exp2(step_q * a2[1, n])
                            decays[0, j, n] = decay_p
                            decays[1, j, n] = decay_q
                            bn = B_c[j, n]
                            h_p = decay_p * hcur[0, n] + drive_p * bn
                            h_q = decay_q * hcur[1, n] + drive_q * bn
                            hcur[0, n] = h_p
                            hcur[1, n] = h_q
                            states[0, j + 1, n] = h_p
                            states[1, j + 1, n] = h_q
                    # Adjoint recurrence backwards in time, fused with every gradient of the step.
                    skip_p = D[dp] if has_d else zero
                    skip_q = D[dq] if has_d else zero
                    up_c, uq_c = u[b, dp, t0:t1], u[b, dq, t0:t1]
                    dup_c, ddp_c = du[b, dp, t0:t1], ddelta[b, dp, t0:t1]
                    duq_c, ddq_c = du[b, dq, t0:t1], ddelta[b, dq, t0:t1]
                    bias_p = zero
                    bias_q = zero
                    for jj in range(count):
                        j = np.uintp(count - 1 - jj)  # unsigned: no negative-index wrap-around code
                        j1 = np.uintp(count - jj)
                        dy_p, dy_q = dys[0, j], dys[1, j]
                        step_p, step_q = steps[0, j], steps[1, j]
                        drive_p, drive_q = drives[0, j], drives[1, j]
                        gb_p = zero
                        gb_q = zero
                        da_sum_p = zero
                        da_sum_q = zero
                        for n in range(n_state):
                            cn = C_c[j, n]
                            bn = B_c[j, n]
                            g_p = gd[0, n] + dy_p * cn
                            g_q = gd[1, n] + dy_q * cn
                            decay_p = decays[0, j, n]
                            decay_q = decays[1, j, n]
                            gb_p += g_p * bn
                            gb_q += g_q * bn
                            da_p = g_p * states[0, j, n] * decay_p  # dL/d(dt*A) at (t, n)
                            da_q = g_q * states[1, j, n] * decay_q
                            da_sum_p += da_p * a_p[n]
                            da_sum_q += da_q * a_q[n]
                            acc_a[0, n] += da_p * step_p
                            acc_a[1, n] += da_q * step_q
                            dC_loc[j, n] += dy_p * states[0, j1, n] + dy_q * states[1, j1, n]
                            dB_loc[j, n] += g_p * drive_p + g_q * drive_q
                            gd[0, n] = g_p * decay_p
                            gd[1, n] = g_q * decay_q
                        grad_p = (up_c[j] * gb_p + da_sum_p) * slopes[0, j]
                        grad_q = (uq_c[j] * gb_q + da_sum_q) * slopes[1, j]
                        bias_p += grad_p
                        bias_q += grad_q
                        dup_c[j] = step_p * gb_p + skip_p * dy_p
                        ddp_c[j] = grad_p
                        if has_q:
                            duq_c[j] = step_q * gb_q + skip_q * dy_q
                            ddq_c[j] = grad_q
                    for n in range(n_state):
                        adj[dp - d0, n] = gd[0, n]
                        dA_acc[dp - d0, n] = acc_a[0, n]
                        if has_q:
                            adj[dq - d0, n] = gd[1, n]
                            dA_acc[dq - d0, n] = acc_a[1, n]
                    if has_bias:
                        dbias_part[b, dp] += bias_p
                        if has_q:
                            dbias_part[b, dq] += bias_q
                for j in range(count):
                    for n in range(n_state):
                        dB_c[j, n] += dB_loc[j, n]
                        dC_c[j, n] += dC_loc[j, n]
            for d in range(d0, d1):
                for n in range(n_state):
                    dA_part[b, d, n] = dA_acc[d - d0, n]

    return forward_kernel, backward_kernel


#: state sizes with kernels specialised at compile time (others share one generic pair)
SPECIALISED_N = (16,)
_KERNELS: dict[int, tuple] = {}


def _kernels_for(n_state: int):
    key = n_state if n_state in SPECIALISED_N else 0
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernels(key)
    return _KERNELS[key]


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
    out = _large_arrays.empty(u.shape, u.dtype)
    y_pre = _large_arrays.empty(u.shape, u.dtype) if (need_backward and z is not None) else np.empty((0, 0, 0), u.dtype)
    checkpoints = np.empty((batch, dim, n_chunks, n_state), dtype=u.dtype)
    last_state = np.empty((batch, dim, n_state), dtype=u.dtype)
    none = _empty(u.dtype)
    forward_kernel, _ = _kernels_for(n_state)
    forward_kernel(u, delta, A, Bt, Ct, none if D is None else D, none.reshape(0, 0, 0) if z is None else z,
                    none if delta_bias is None else delta_bias, softplus, slices, chunk,
                    out, y_pre, checkpoints, last_state)
    return out, last_state, ((y_pre, checkpoints) if need_backward else None)


def scan_backward(u, delta, A, Bt, Ct, D, z, delta_bias, softplus: bool, slices: int, chunk: int,
                  saved, dout, d_last):
    """Run the backward kernel; returns (du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias).

    ``chunk`` must be the forward's and at most ``MAX_CHUNK``.

    dBt, dCt are summed over the channel slices (Bt's shape); dA, dD, ddelta_bias over batch;
    entries for absent D / z / delta_bias are None. ``d_last`` may be None.
    """
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be between 1 and {MAX_CHUNK}, got {chunk}")
    y_pre, checkpoints = saved
    batch, dim, _ = u.shape
    dtype = u.dtype
    if d_last is None:
        d_last = np.empty((0, 0, 0), dtype=dtype)
    du, ddelta = _large_arrays.empty(u.shape, dtype), _large_arrays.empty(u.shape, dtype)
    dz = _large_arrays.empty(u.shape, dtype) if z is not None else np.empty((0, 0, 0), dtype)
    dA_part = np.empty((batch,) + A.shape, dtype=dtype)
    dBt = _large_arrays.zeros((slices,) + Bt.shape, dtype)
    dCt = _large_arrays.zeros((slices,) + Ct.shape, dtype)
    dD_part = np.zeros((batch, dim), dtype=dtype)
    dbias_part = np.zeros((batch, dim), dtype=dtype)
    none = _empty(dtype)
    _, backward_kernel = _kernels_for(A.shape[1])
    backward_kernel(u, delta, A, Bt, Ct, none if D is None else D, none.reshape(0, 0, 0) if z is None else z,
                     none if delta_bias is None else delta_bias, softplus, slices, chunk, y_pre, checkpoints,
                     dout, d_last, du, ddelta, dz, dA_part, dBt, dCt, dD_part, dbias_part)
    return (du, ddelta, dA_part.sum(0), dBt.sum(0) if slices > 1 else dBt[0], dCt.sum(0) if slices > 1 else dCt[0],
            dD_part.sum(0) if D is not None else None, dz if z is not None else None,
            dbias_part.sum(0) if delta_bias is not None else None)
