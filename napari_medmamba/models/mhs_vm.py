"""MHS-VM (Ji 2024): VM-UNet with multi-head scanning in parallel subspaces, for 2D images,
plus :class:`SliceWise`, which applies a 2D network to a volume slice by slice.

Parameter names follow the official ``VSSM`` module (github.com/PixDeep/MHS-VM), without its alias
entries (``mhs.x_ssproj_W`` and ``scanning.seq2seq_engine.*`` repeat tensors stored elsewhere) and
without the ``vmunet.`` prefix of its ``VMUNet`` wrapper; ``checkpoints.load_checkpoint`` maps them.
Unlike the official code, whose scan routes are precomputed for 256 x 256 inputs, the routes are
generated (and cached) for whatever size comes in. Every input axis must be divisible by 32.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mamba import dt_bias_init, selective_scan

__all__ = ["MHSVM", "SliceWise", "scan_routes", "apply_slicewise"]

PATTERNS = "CXSZ"
"""Scan patterns in head order: C (snake rows/columns), X (diagonal zigzags), S (spirals), Z (raster)."""


def _snake_rows(h: int, w: int) -> list[tuple[int, int]]:
    return [(i, j if i % 2 == 0 else w - 1 - j) for i in range(h) for j in range(w)]


def _snake_cols(h: int, w: int) -> list[tuple[int, int]]:
    return [(i if j % 2 == 0 else h - 1 - i, j) for j in range(w) for i in range(h)]


def _diagonal(h: int, w: int) -> list[tuple[int, int]]:
    out = []
    for k in range(h + w - 1):
        diag = [(i, k - i) for i in range(max(0, k - w + 1), min(k, h - 1) + 1)]
        out.extend(reversed(diag) if k % 2 == 0 else diag)
    return out


def _spiral(h: int, w: int) -> list[tuple[int, int]]:
    """Clockwise spiral from the top-left corner, first step to the right."""
    out = []
    top, left, bottom, right = 0, 0, h - 1, w - 1
    while top <= bottom and left <= right:
        out.extend((top, j) for j in range(left, right + 1))
        out.extend((i, right) for i in range(top + 1, bottom + 1))
        if top < bottom:
            out.extend((bottom, j) for j in range(right - 1, left - 1, -1))
        if left < right:
            out.extend((i, left) for i in range(bottom - 1, top, -1))
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return out


def _raster_rows(h: int, w: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(h) for j in range(w)]


def _raster_cols(h: int, w: int) -> list[tuple[int, int]]:
    return [(i, j) for j in range(w) for i in range(h)]


@lru_cache(maxsize=64)
def scan_routes(h: int, w: int) -> torch.Tensor:
    """(8, 2, h*w) long tensor: for each route (two per pattern, C X S Z), the flat pixel index visited
    at each step, and its inverse permutation (the step at which each pixel is visited)."""
    diag, spiral = _diagonal(h, w), _spiral(h, w)
    routes = [_snake_rows(h, w), _snake_cols(h, w),
              diag, [(i, w - 1 - j) for i, j in diag],
              spiral, [(h - 1 - i, j) for i, j in spiral],
              _raster_rows(h, w), _raster_cols(h, w)]
    cpu = torch.device("cpu")  # explicit: the cache must not hold meta/GPU tensors
    # Cached tensors must be ordinary tensors even when first built under torch.inference_mode()
    # (the inference engine's), or a later training step could not save them for backward.
    with torch.inference_mode(False):
        out = torch.empty(8, 2, h * w, dtype=torch.long, device=cpu)
        for r, pos in enumerate(routes):
            t = torch.tensor([i * w + j for i, j in pos], dtype=torch.long, device=cpu)
            out[r, 0] = t
            out[r, 1, t] = torch.arange(h * w, device=cpu)
    return out


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (identity in eval mode or with p = 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class MambaEngine(nn.Module):
    """Four independent S6 scans (K=4 routes) over (b, 4, d, l) sequences, packed into one scan call."""

    def __init__(self, d_model: int, d_state: int = 16, dt_rank: int | str = "auto", dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, k: int = 4) -> None:
        super().__init__()
        self.d_model = self.d_inner = d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.k = k
        bound = d_model ** -0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_model).uniform_(-bound, bound))
        std = self.dt_rank ** -0.5 * dt_scale
        w = torch.full((k, d_model, self.dt_rank), std) if dt_init == "constant" else \
            torch.empty(k, d_model, self.dt_rank).uniform_(-std, std)
        self.dt_projs_weight = nn.Parameter(w)
        self.dt_projs_bias = nn.Parameter(torch.stack([dt_bias_init(d_model, dt_min, dt_max, dt_init_floor)
                                                       for _ in range(k)]))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_model, 1)
        self.A_logs = nn.Parameter(torch.log(A))
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(k * d_model))
        self.Ds._no_weight_decay = True

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """(b, k, d, l) -> (b, k, d, l), float32."""
        b, k, d, l = xs.shape
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan(xs.float().reshape(b, k * d, l), dts.float().reshape(b, k * d, l),
                            -torch.exp(self.A_logs.float()), Bs.float().contiguous(), Cs.float().contiguous(),
                            self.Ds.float(), z=None, delta_bias=self.dt_projs_bias.float().reshape(-1),
                            delta_softplus=True)
        return ys.reshape(b, k, d, l)


class GFU(nn.Module):
    """Scan-route aggregation gate: sum over routes times ReLU(relative CV across routes - t)."""

    def __init__(self, t: float = 0.0) -> None:
        super().__init__()
        self.t = t
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, k, d, l) -> (b, d, l)."""
        x_min = x.min(dim=1, keepdim=True).values
        cv = x.std(dim=1, keepdim=True) / ((x - x_min).mean(dim=1, keepdim=True) + 1e-5)
        return (x.sum(dim=1, keepdim=True) * self.act(cv - self.t)).squeeze(1)


class ScanHead(nn.Module):
    """One head: two routes of one pattern, each scanned forwards and backwards, fused by :class:`GFU`."""

    def __init__(self, dim_sub: int, d_state: int, gfu_t: float = 0.0, pattern: str = "C") -> None:
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS!r}")
        self.scan_pattern = pattern
        self.route = 2 * PATTERNS.index(pattern)
        self.esfusion = GFU(t=gfu_t)
        self.mambaeng = MambaEngine(d_model=dim_sub, d_state=d_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, d, h, w) -> (b, d, h*w)."""
        b, d, h, w = x.shape
        r = scan_routes(h, w)[self.route:self.route + 2].to(x.device)
        flat = x.reshape(b, d, h * w)
        s0, s1 = flat.index_select(-1, r[0, 0]), flat.index_select(-1, r[1, 0])
        ys = self.mambaeng(torch.stack([s0, s0.flip(-1), s1, s1.flip(-1)], dim=1))
        p0, p1 = r[0, 1], r[1, 1]
        ys = torch.stack([ys[:, 0].index_select(-1, p0), ys[:, 1].flip(-1).index_select(-1, p0),
                          ys[:, 2].index_select(-1, p1), ys[:, 3].flip(-1).index_select(-1, p1)], dim=1)
        return self.esfusion(ys)


class MHSM(nn.Module):
    """Multi-head scan module: project to ``head_num`` subspaces, scan each with its own pattern,
    concatenate, LayerNorm and project back. (b, d, h, w) -> (b, h, w, d)."""

    def __init__(self, d_model: int, d_state: int = 16, head_num: int = 3, gfu_t: float = 0.0,
                 with_proj: bool = True) -> None:
        super().__init__()
        if not 1 <= head_num <= 4:
            raise ValueError("head_num must be 1..4")
        self.d_model = d_model
        self.head_num = head_num
        self.dim_sub = d_model // head_num
        self.x_ssproj = nn.Linear(d_model, self.dim_sub * head_num, bias=False)
        for p in PATTERNS[:head_num]:
            setattr(self, f"scanhead_{p}", ScanHead(self.dim_sub, d_state, gfu_t, pattern=p))
        self.with_proj = with_proj
        if with_proj:
            self.cat_norm = nn.LayerNorm(head_num * self.dim_sub)
            self.y_proj = nn.Linear(head_num * self.dim_sub, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        xs = torch.einsum("bdhw,cd->bchw", x, self.x_ssproj.weight).split(self.dim_sub, dim=1)
        y = torch.cat([getattr(self, f"scanhead_{p}")(xi) for p, xi in zip(PATTERNS, xs)], dim=1).transpose(1, 2)
        if self.with_proj:
            y = self.y_proj(self.cat_norm(y))
        return y.reshape(b, h, w, -1)


class VSSGate(nn.Module):
    """Gated visual state-space mixer: in_proj -> (x, z); x -> dwconv -> SiLU -> MHSM -> LayerNorm; * SiLU(z)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, bias: bool = False,
                 conv_bias: bool = True, dropout: float = 0.0, head_num: int = 3, gfu_t: float = 0.0,
                 with_proj: bool = True) -> None:
        super().__init__()
        self.d_model = self.d_inner = d_model
        self.in_proj = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.conv2d = nn.Conv2d(d_model, d_model, d_conv, padding=(d_conv - 1) // 2, groups=d_model, bias=conv_bias)
        self.act = nn.SiLU()
        self.mhs = MHSM(d_model, d_state, head_num, gfu_t, with_proj)
        self.out_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        out = self.out_norm(self.mhs(x)) * F.silu(z)
        return self.dropout(out) if self.dropout is not None else out


class VSSBlock(nn.Module):
    def __init__(self, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16, **mixer) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = VSSGate(hidden_dim, d_state=d_state, **mixer)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class PatchEmbed2D(nn.Module):
    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """(b, h, w, c) -> (b, h/2, w/2, 2c) by concatenating 2x2 neighbours."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """(b, h, w, dim) -> (b, s*h, s*w, dim/s) by a linear expansion and pixel shuffle (channels-last)."""

    def __init__(self, dim: int, dim_scale: int, out_dim: int) -> None:
        super().__init__()
        self.dim_scale = dim_scale
        self.expand = nn.Linear(dim, dim_scale * dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.dim_scale
        x = self.expand(x)
        c = x.shape[-1] // (s * s)
        x = x.reshape(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return self.norm(x)


class VSSLayer(nn.Module):
    def __init__(self, dim: int, depth: int, drop_path: list[float], downsample: bool, upsample: bool,
                 **block) -> None:
        super().__init__()
        if upsample:  # decoder stage: expand the coarser stage (2 * dim channels) first
            self.upsample = PatchExpand(2 * dim, 2, dim)
        self.blocks = nn.ModuleList([VSSBlock(dim, drop_path[i], **block) for i in range(depth)])
        if downsample:
            self.downsample = PatchMerging2D(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class MHSVM(nn.Module):
    """MHS-VM U-Net (the official ``VSSM``): (B, in_chans, H, W) -> logits (B, num_classes, H, W).

    A one-channel input is repeated to ``in_chans`` channels when the model takes 3 (as the official
    ``VMUNet`` does). H and W must be divisible by 32. Always returns logits (the official wrapper
    applies a sigmoid when ``num_classes == 1``).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1, depths: tuple[int, ...] = (2, 2, 2, 2),
                 depths_decoder: tuple[int, ...] = (2, 2, 2, 1), dims: tuple[int, ...] = (96, 192, 384, 768),
                 d_state: int = 16, drop_path_rate: float = 0.2, head_num: int = 4, gfu_t: float = 0.0,
                 with_proj: bool = True, patch_size: int = 4) -> None:
        super().__init__()
        n = len(depths)
        if len(depths_decoder) != n or len(dims) != n:
            raise ValueError("depths, depths_decoder and dims need the same length")
        self.arch_config = {"in_chans": in_chans, "num_classes": num_classes, "depths": list(depths),
                            "depths_decoder": list(depths_decoder), "dims": list(dims), "d_state": d_state,
                            "drop_path_rate": drop_path_rate, "head_num": head_num, "gfu_t": gfu_t,
                            "with_proj": with_proj, "patch_size": patch_size}
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_layers = n
        self.stride = patch_size * 2 ** (n - 1)
        self.patch_embed = PatchEmbed2D(patch_size, in_chans, dims[0])
        block = {"d_state": d_state, "head_num": head_num, "gfu_t": gfu_t, "with_proj": with_proj}
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dpr_dec = torch.linspace(0, drop_path_rate, sum(depths_decoder), device="cpu").tolist()[::-1]
        self.layers = nn.ModuleList([
            VSSLayer(dims[i], depths[i], dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < n - 1,
                     upsample=False, **block) for i in range(n)])
        dec = list(dims)[::-1]
        self.layers_up = nn.ModuleList([
            VSSLayer(dec[i], depths_decoder[i], dpr_dec[sum(depths_decoder[:i]):sum(depths_decoder[:i + 1])],
                     downsample=False, upsample=i != 0, **block) for i in range(n)])
        self.final_up = PatchExpand(dec[-1], patch_size, dec[-1] // patch_size)
        self.final_conv = nn.Conv2d(dec[-1] // patch_size, num_classes, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"MHSVM expects (B, C, H, W) with H and W divisible by {self.stride}; "
                             f"got {tuple(x.shape)}")
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        x = self.patch_embed(x)
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        for i, layer in enumerate(self.layers_up):
            x = layer(x if i == 0 else x + skips[-i])
        return self.final_conv(self.final_up(x).permute(0, 3, 1, 2))


class SliceWise(nn.Module):
    """Applies a 2D network to every slice of (B, C, D, H, W) along ``axis`` (0, 1 or 2 for D, H, W),
    ``batch_size`` slices at a time; returns (B, classes, D, H, W)."""

    def __init__(self, net: nn.Module, axis: int = 0, batch_size: int = 16) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError("axis must be 0, 1 or 2")
        self.net = net
        self.axis = axis
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_slicewise(self.net, x, self.axis, self.batch_size)


def apply_slicewise(net: nn.Module, x: torch.Tensor, axis: int = 0, batch_size: int = 16) -> torch.Tensor:
    """Run the 2D ``net`` on the slices of ``x`` (B, C, D, H, W) along spatial ``axis``, batched."""
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    moved = x.movedim(2 + axis, 1)  # (B, S, C, a, b)
    s, rest = moved.shape[1], moved.shape[3:]
    slices = moved.reshape(b * s, c, *rest)
    out = torch.cat([net(slices[i:i + batch_size]) for i in range(0, b * s, batch_size)], dim=0)
    return out.reshape(b, s, out.shape[1], *rest).movedim(1, 2 + axis)
