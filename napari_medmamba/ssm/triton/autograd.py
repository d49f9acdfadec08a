"""Host side of the Triton selective scan: launches, and the torch.autograd.Function.

Imports triton (through the kernel modules): import only after ``is_available()`` said yes.
"""

from __future__ import annotations

import torch

from .backward import _bwd_tile_adjoint_kernel, _bwd_tile_grad_kernel
from .fast_launch import launch
from .forward import _chunk_combine_kernel, _chunk_state_kernel, _scan_out_kernel
from .launch import ScanConfig, choose_config, next_pow2


def _contig_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bc_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, group, n) strides of B/C given as (b, N, L) or (b, G, N, L)."""
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _combine(x: torch.Tensor, dsum: torch.Tensor, Af: torch.Tensor, dim: int, n_state: int,
             reverse: bool, cfg: ScanConfig) -> torch.Tensor:
    n_lanes = x.shape[0] * x.shape[1] * x.shape[2]
    n_chunks = x.shape[-1]
    out = torch.empty_like(x)
    cb = min(cfg.combine_cb, max(2, next_pow2(n_chunks)))
    grid = (triton_cdiv(n_lanes, cfg.combine_lanes),)
    launch(_chunk_combine_kernel, grid, x, dsum, Af, out, n_lanes, dim, n_state, n_chunks,
           REVERSE=reverse, BLOCK_LANES=cfg.combine_lanes, CB=cb,
           num_warps=4)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, save_states: bool,
                 return_last: bool, cfg: ScanConfig | None = None, **override):
    """Run the forward passes. Returns (out, last_state or None, saved or None, cfg); ``saved`` (with
    ``save_states``) is what :func:`scan_backward` needs: the tile-start states, and with z the ungated y
    (in u's dtype), which spares the backward one scan per state column."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = 1 if B.dim() == 3 else B.shape[1]
    if cfg is None:
        cfg = choose_config(batch, dim, length, n_state, groups, u.device, half=u.element_size() < 4,
                            **override)
    dpg = dim // groups
    T, bd = cfg.T, cfg.block_d
    bn = next_pow2(n_state)
    chunk_len = cfg.chunk_tiles * T
    n_chunks = max(1, triton_cdiv(length, chunk_len))
    n_tiles = max(1, triton_cdiv(length, T))
    Af = A.float().contiguous()  # fp32; the kernels scale it by log2(e) for exp2
    bias = delta_bias.float().contiguous() if delta_bias is not None else Af
    Dp = D.float().contiguous() if D is not None else Af
    zz = z if z is not None else u
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    send = Af
    if n_chunks > 1:
        hend = torch.empty(batch, dim, n_state, n_chunks, **f32)
        dsum = torch.empty(batch, dim, n_chunks, **f32)
        launch(_chunk_state_kernel, (n_chunks, batch * (dim // bd)),
            u, delta, Af, B, bias, hend, dsum, dim, length, n_state, dpg, chunk_len,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *_bc_strides(B),
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            BLOCK_D=bd, BLOCK_N=bn, T=T, UNROLL=cfg.unroll_n, num_warps=cfg.num_warps)
        send = _combine(hend, dsum, Af, dim, n_state, False, cfg)
    hs = torch.empty(batch, dim, n_state, n_tiles, **f32) if save_states else Af
    last = torch.empty(batch, dim, n_state, **f32) if return_last else Af
    save_y = save_states and z is not None
    y = torch.empty(u.shape, dtype=u.dtype, device=u.device) if save_y else Af
    launch(_scan_out_kernel, (n_chunks, batch * (dim // bd)),
        u, delta, Af, B, C, Dp, zz, bias, send, out, hs, last, y,
        dim, length, n_state, dpg, chunk_len, n_tiles,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *_bc_strides(B),
        *_bc_strides(C), zz.stride(0), zz.stride(1), out.stride(0), out.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, HAS_CARRY=n_chunks > 1, SAVE_STATES=save_states,
        SAVE_LAST=return_last, SAVE_Y=save_y, BLOCK_D=bd, BLOCK_N=bn, T=T, UNROLL=cfg.unroll_n,
        num_warps=cfg.num_warps)
    saved = ((hs, y) if save_y else (hs,)) if save_states else None
    return out, (last if return_last else None), saved, cfg


def scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, softplus: bool, saved: tuple[torch.Tensor, ...],
                  cfg: ScanConfig):
    """All gradients (du, ddelta, dA, dB, dC, dD, dz, d_delta_bias); None for absent inputs.

    ``saved``: :func:`scan_forward`'s (tile-start states[, ungated y when z is given])."""
    hs, *y_saved = saved
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = 1 if B.dim() == 3 else B.shape[1]
    dpg = dim // groups
    T = cfg.T
    n_tiles = hs.shape[-1]
    dout = _contig_last(dout)
    Af = A.float().contiguous()  # fp32; the kernels scale it by log2(e) for exp2
    bias = delta_bias.float().contiguous() if delta_bias is not None else Af
    Dp = D.float().contiguous() if D is not None else Af
    zz = z if z is not None else u
    f32 = dict(dtype=torch.float32, device=u.device)
    bd = cfg.block_d
    if n_tiles > 1:
        E = torch.empty(batch, dim, n_state, n_tiles, **f32)
        dsum = torch.empty(batch, dim, n_tiles, **f32)
        launch(_bwd_tile_adjoint_kernel, (n_tiles, batch * (dim // bd)),
            delta, Af, C, zz, bias, dout, E, dsum, dim, length, n_state, dpg,
            delta.stride(0), delta.stride(1), *_bc_strides(C), zz.stride(0), zz.stride(1),
            dout.stride(0), dout.stride(1),
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            BLOCK_D=bd, T=T, num_warps=cfg.num_warps)
        R = _combine(E, dsum, Af, dim, n_state, True, cfg)
    else:
        R = Af  # never read: a single tile has no right carry
    # contiguous (the kernel's layout), even where u / delta / z are strided views
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device) if z is not None else Af
    bdb, split = cfg.bwd_block_d, cfg.bwd_split
    sub = dpg // (bdb * split)
    params_p = torch.empty(batch, n_tiles, dim, n_state + 2, **f32)  # [dA | dD | d_bias] per (batch, tile)
    bc_p = torch.empty(2, batch, split, groups, n_state, length, **f32)  # dB, dC partial rows
    launch(_bwd_tile_grad_kernel, (n_tiles, batch * groups * split),
        u, delta, Af, B, C, Dp, zz, bias, dout, hs, R, y_saved[0] if y_saved else hs,  # hs: never read
        du, ddelta, dz, params_p, bc_p[0], bc_p[1],
        dim, length, n_state, dpg, split,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *_bc_strides(B),
        *_bc_strides(C), zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, BLOCK_D=bdb, T=T, SUB=sub, num_warps=cfg.bwd_num_warps)
    params = params_p.sum((0, 1)) if batch * n_tiles > 1 else params_p[0, 0]
    dA = params[:, :n_state].to(A.dtype)
    dD = params[:, n_state].to(D.dtype) if D is not None else None
    dbias = params[:, n_state + 1].to(delta_bias.dtype) if delta_bias is not None else None
    bc = bc_p.sum(2) if split > 1 else bc_p[:, :, 0]  # (2, batch, groups, N, L)
    dB = (bc[0, :, 0] if B.dim() == 3 else bc[0]).to(B.dtype)
    dC = bc[1] if C.dim() == 4 else (bc[1, :, 0] if groups == 1 else bc[1].sum(1))
    dC = dC.to(C.dtype)
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dbias


class SelectiveScanTriton(torch.autograd.Function):
    """Forward and backward through one path's Triton kernels; the last state is not differentiable.

    ``kernels`` is the path's (forward, backward) pair: (:func:`scan_forward`, :func:`scan_backward`)
    for the chunked path, (``short.short_forward``, ``short.short_backward``) for the short one.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, return_last, override, kernels):
        forward_fn, ctx.backward_fn = kernels
        out, last, saved, cfg = forward_fn(u, delta, A, B, C, D, z, delta_bias, softplus, True,
                                           return_last, **(override or {}))
        ctx.saved_is_tuple = isinstance(saved, tuple)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *(saved if ctx.saved_is_tuple else (saved,)))
        ctx.softplus = softplus
        ctx.cfg = cfg
        if return_last:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, B, C, D, z, delta_bias, *saved = ctx.saved_tensors
        saved = tuple(saved) if ctx.saved_is_tuple else saved[0]
        grads = ctx.backward_fn(dout, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, saved, ctx.cfg)
        return (*grads, None, None, None, None)


def _prep(u, delta, A, B, C, D, z, delta_bias):
    if not u.is_cuda and not _interpreting():
        raise ValueError("the Triton selective scan needs CUDA tensors")
    if A.is_complex():
        raise NotImplementedError("the Triton selective scan supports real A only")
    u, delta = _contig_last(u), _contig_last(delta)
    B, C = _contig_last(B), _contig_last(C)
    z = _contig_last(z) if z is not None else None
    dim = u.shape[1]
    for name, x in (("B", B), ("C", C)):
        if x.dim() == 4 and dim % x.shape[1]:
            raise ValueError(f"{name} has {x.shape[1]} groups, which do not divide dim={dim}")
    return u, delta, A, B, C, D, z, delta_bias


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


PATHS = ("auto", "short", "chunked")


def _route(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor, config: dict | None):
    """(use the short path?, its overrides, the chunked path's overrides).

    ``config["path"]``: "short", "chunked" or "auto" (default). "auto" takes the short path
    for L <= ``short.SHORT_L_MAX`` unless ``config`` sets chunked launch parameters
    (``ScanConfig`` fields), which only mean something to the chunked path.
    """
    from .short import SHORT_KEYS, SHORT_L_MAX, short_supported

    cfg = dict(config or {})
    path = str(cfg.pop("path", "auto")).lower()
    if path not in PATHS:
        raise ValueError(f"config['path'] must be one of {PATHS}, got {path!r}")
    short_over = {k: cfg.pop(k) for k in SHORT_KEYS if k in cfg}
    ok = short_supported(B, C)
    if path == "short" and not ok:
        raise ValueError("the short path needs B and C with the same number of groups")
    use_short = path == "short" or (path == "auto" and ok and not cfg
                                     and u.shape[-1] <= SHORT_L_MAX)
    return use_short, short_over, cfg


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, *, config=None):
    """mamba_ssm ``selective_scan_fn`` semantics through the Triton kernels.

    Short sequences (L <= ``short.SHORT_L_MAX``) run the single-launch sequential kernels of
    ``short.py``, longer ones the chunked kernels. ``config``: optional dict; ``"path"``
    forces ``"short"`` or ``"chunked"``; other keys override launch parameters (see
    ``launch.ScanConfig`` and ``short.SHORT_KEYS``). Differentiable in every tensor argument;
    the returned last state is not.
    """
    u, delta, A, B, C, D, z, delta_bias = _prep(u, delta, A, B, C, D, z, delta_bias)
    use_short, short_over, config = _route(u, B, C, config)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    if use_short:
        from .short import short_backward, short_forward

        kernels, override = (short_forward, short_backward), short_over
    else:
        kernels, override = (scan_forward, scan_backward), config
    if needs_grad:
        return SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                         bool(return_last_state), override, kernels)
    out, last, _, _ = kernels[0](u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), False,
                                 bool(return_last_state), **(override or {}))
    return (out, last) if return_last_state else out


__all__ = ["selective_scan_triton", "SelectiveScanTriton", "scan_forward", "scan_backward"]
