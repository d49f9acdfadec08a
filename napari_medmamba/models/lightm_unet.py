"""LightM-UNet (Liao et al. 2024) for 2D or 3D inputs.

Module and parameter names follow the official network (``nnunetv2/nets/LightMUNet.py``, built on
MONAI blocks), so the state dict of the official nnU-Net v2 trainer loads with strict key matching:
residual vision-Mamba (RVM) encoder layers, additive skips, a light depthwise-conv decoder and a
single full-resolution output (no deep supervision). Every input axis must be divisible by
``2 ** (len(blocks_down) - 1)`` (8 with the default four levels).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .mamba import (Mamba, channels_first_layer_norm, channels_first_linear, cpu_inference, cpu_layer_kernels,
                    cpu_streaming, piece_array, piece_array_like, piece_tensor)
from .group_norm import WideGroupNorm

__all__ = ["LightMUNet", "MambaLayer", "MaxPool", "ResMambaBlock", "ResUpBlock", "warm_cpu_kernels"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
DEPTHWISE_NUMBA_MIN_VOXELS = 1 << 17
"""Voxels per channel from which CPU inference runs a depthwise 3x3x3 convolution with numba (``ConvOnly``)."""
PIECE_TOKENS = 4096
"""Tokens per piece when a Mamba layer runs piece by piece in CPU inference (``MambaLayer._forward_pieces``);
0 turns pieces off (whole sequences, channels-first: to compare, as ``benchmarks/cpu_forward.py`` does)."""


class MaxPool(nn.Module):
    """Max pooling with window = stride along every spatial axis (``nn.MaxPool{2,3}d(stride, stride)``).

    CPU inference with stride 2 on even sizes takes pairwise maxima of strided views instead (the same values;
    8x faster than PyTorch's CPU pooling, which also computes the argmax indices: 13 -> 1.7 ms at
    64 x 40 x 56 x 40). When training, on a GPU or with ``CPU_LAYERS_ENV=0``, PyTorch's pooling runs.
    """

    def __init__(self, spatial_dims: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pool = _POOL[spatial_dims](kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 2 or any(s % 2 for s in x.shape[2:]) or not cpu_inference(x):
            return self.pool(x)
        for dim in range(x.dim() - 1, 1, -1):  # last axis first: the first maximum halves the most data
            lead = (slice(None),) * dim
            x = torch.maximum(x[lead + (slice(0, None, 2),)], x[lead + (slice(1, None, 2),)])
        return x


class ConvOnly(nn.Module):
    """A single convolution held as ``.conv`` (MONAI ``Convolution(conv_only=True)`` layout).

    In CPU inference a 1x1 convolution that is a per-channel scale (depthwise, or from one input channel) runs as
    one broadcast multiply-add: oneDNN took 238 ms for the depthwise one on a 32 x 128 x 80 x 144 map (it
    reorders the layout first), the multiply-add 10 ms. The depthwise 3x3x3 convolution of a map of at least
    ``DEPTHWISE_NUMBA_MIN_VOXELS`` voxels runs as a numba kernel (``_cpu_numba_layers.depthwise_conv3d_3``):
    237 -> 55 ms on that map, 50 -> 25 ms on 64 x 64 x 40 x 72; on smaller maps oneDNN is faster
    (7.9 against 11.4 ms on a hippocampus patch). Same values up to rounding.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                                        groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        per_channel = conv.in_channels == 1 or conv.groups == conv.in_channels == conv.out_channels
        if per_channel and all(k == 1 for k in conv.kernel_size) and cpu_inference(x, conv.weight):
            shape = (1, conv.out_channels) + (1,) * (x.dim() - 2)
            scale = conv.weight.reshape(shape)
            return x * scale if conv.bias is None else torch.addcmul(conv.bias.reshape(shape), x, scale)
        if (conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (3, 3, 3) and conv.bias is None
                and x[0, 0].numel() >= DEPTHWISE_NUMBA_MIN_VOXELS and x.is_contiguous()):
            kernels = cpu_layer_kernels(x, conv.weight)
            if kernels is not None:
                weight = conv.weight.detach()[:, 0].contiguous().numpy()
                return torch.from_numpy(kernels.depthwise_conv3d_3(x.numpy(), weight))
        return conv(x)


def dwconv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
           bias: bool = False) -> nn.Sequential:
    """Depthwise convolution then pointwise convolution (``get_dwconv_layer``)."""
    return nn.Sequential(ConvOnly(spatial_dims, in_channels, in_channels, kernel_size, groups=in_channels, bias=bias),
                         ConvOnly(spatial_dims, in_channels, out_channels, 1, bias=bias))


class MambaLayer(nn.Module):
    """Tokens of a feature map -> LayerNorm -> Mamba + scaled skip -> LayerNorm -> Linear.

    ``checkpointing`` (a plain attribute, not in the state dict): None, or how activation checkpointing
    recomputes this layer in backward instead of keeping its activations (training with grad only):
    ``"layer"`` keeps only the input and reruns the whole layer, selective scan included; ``"cheap"``
    reruns only the memory-bound parts around the scan (norm, in_proj, conv1d, SiLU, x_proj, dt_proj;
    out_proj, skip, norm, proj) and keeps the scan's inputs and output.
    """

    CHECKPOINT_MODES = ("layer", "cheap")

    def __init__(self, input_dim: int, output_dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.norm = nn.LayerNorm(input_dim)
        self.mamba = Mamba(d_model=input_dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(input_dim, output_dim)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.checkpointing: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            x = x.float()
        mode = self.checkpointing if self.training and torch.is_grad_enabled() else None
        if mode == "layer":  # no random ops in here: the RNG state need not be kept for the rerun
            return checkpoint(self._forward, x, use_reentrant=False, preserve_rng_state=False)
        if mode == "cheap":
            return self._forward_cheap_checkpointed(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        dims = x.shape[2:]
        flat = x.reshape(b, c, -1)  # channels-first tokens (B, C, L): a view, no transposed copies
        if (PIECE_TOKENS > 0 and self.mamba.conv1d.bias is not None and self.norm.weight is not None
                and self.norm.bias is not None and cpu_streaming(flat, self.norm.weight)):
            return self._forward_pieces(flat).reshape(b, self.output_dim, *dims)
        y = self.mamba.forward_channels_first(channels_first_layer_norm(self.norm, flat)) + self.skip_scale * flat
        y = channels_first_linear(self.proj, channels_first_layer_norm(self.norm, y))
        return y.reshape(b, self.output_dim, *dims)

    def _forward_pieces(self, flat: torch.Tensor) -> torch.Tensor:
        """``_forward`` on (B, C, L) tokens in token-major pieces of ``PIECE_TOKENS`` (CPU inference,
        :func:`cpu_streaming`): each piece goes through norm, Mamba, skip, norm and proj while it is in the cache;
        the conv1d's history and the scan's state carry over, so the output equals the whole-sequence path's."""
        from ..ssm import _cpu_numba_tokens as kernels

        length = flat.shape[-1]
        out = flat.new_empty(flat.shape[0], self.output_dim, length)
        out_cf = out.numpy()
        carry = self.mamba.start_pieces(flat.shape[0])
        x_cf = flat.contiguous().numpy()
        weight, bias, eps = self.norm.weight.detach().numpy(), self.norm.bias.detach().numpy(), float(self.norm.eps)
        scale = float(self.skip_scale)
        dt = carry.products[0].dtype  # the projections' dtype (mamba.piece_product_dtype)
        like = piece_array_like(dt)  # the kernels write the products' inputs in that dtype
        w_proj = self.proj.weight.detach().to(dt)
        b_proj = None if self.proj.bias is None else self.proj.bias.detach().to(dt)
        for t0 in range(0, length, PIECE_TOKENS):
            piece, normed = kernels.layer_norm_to_tokens(x_cf, t0, min(PIECE_TOKENS, length - t0), weight, bias, eps,
                                                         like)
            y = self.mamba.forward_piece(piece_tensor(normed), carry)
            y = piece_tensor(kernels.skip_layer_norm(piece_array(y), piece, scale, weight, bias, eps, like))
            kernels.tokens_to_channels(piece_array(F.linear(y, w_proj, b_proj)), out_cf, t0)
        return out

    def _scan_inputs(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u, delta, B, C, z = self.mamba.scan_inputs(channels_first_layer_norm(self.norm, flat))
        return u, delta, B, C, z.contiguous()  # a view would keep all of in_proj's output alive for the scan

    def _after_scan(self, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        y = channels_first_linear(self.mamba.out_proj, y) + self.skip_scale * flat
        return channels_first_linear(self.proj, channels_first_layer_norm(self.norm, y))

    def _forward_cheap_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        """``_forward`` with the parts before and after the scan checkpointed (same values)."""
        b, c = x.shape[:2]
        dims = x.shape[2:]
        flat = x.reshape(b, c, -1)
        scan_in = checkpoint(self._scan_inputs, flat, use_reentrant=False, preserve_rng_state=False)
        y = checkpoint(self._after_scan, self.mamba.scan(*scan_in), flat, use_reentrant=False,
                       preserve_rng_state=False)
        return y.reshape(b, self.output_dim, *dims)


def mamba_layer(spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """A :class:`MambaLayer`, followed by max pooling when ``stride`` > 1 (``get_mamba_layer``)."""
    layer = MambaLayer(in_channels, out_channels)
    if stride == 1:
        return layer
    return nn.Sequential(layer, MaxPool(spatial_dims, stride))


def norm_relu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """ReLU(``norm``(x)). CPU float32 inference of a contiguous map runs one fused numba kernel
    (``group_norm_relu``); otherwise the module and ``F.relu``."""
    kernels = cpu_layer_kernels(x, norm.weight) if norm.affine and x.is_contiguous() else None
    if kernels is not None:
        flat = x.numpy().reshape(x.shape[0], x.shape[1], -1)
        out = kernels.group_norm_relu(flat, norm.num_groups, norm.weight.detach().numpy(),
                                      norm.bias.detach().numpy(), float(norm.eps))
        return torch.from_numpy(out).view(x.shape)
    return F.relu(norm(x))


class ResMambaBlock(nn.Module):
    """Residual vision-Mamba block: (GroupNorm, ReLU, MambaLayer) x 2 plus identity."""

    def __init__(self, spatial_dims: int, in_channels: int, num_groups: int = 8) -> None:
        super().__init__()
        self.norm1 = WideGroupNorm(num_groups, in_channels)
        self.norm2 = WideGroupNorm(num_groups, in_channels)
        self.conv1 = mamba_layer(spatial_dims, in_channels, in_channels)
        self.conv2 = mamba_layer(spatial_dims, in_channels, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(norm_relu(self.norm1, x))
        y = self.conv2(norm_relu(self.norm2, y))
        return y + x


class ResUpBlock(nn.Module):
    """Decoder block: GroupNorm, ReLU, depthwise-separable conv + scaled identity, GroupNorm, ReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, num_groups: int = 8, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm1 = WideGroupNorm(num_groups, in_channels)
        self.norm2 = WideGroupNorm(num_groups, in_channels)
        self.conv = dwconv(spatial_dims, in_channels, in_channels, kernel_size)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(norm_relu(self.norm1, x)) + self.skip_scale * x
        return norm_relu(self.norm2, y)


class Upsample(nn.Module):
    """Parameter-free (bi/tri)linear x2 upsampling, ``align_corners=False`` (MONAI non-trainable mode)."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)


def upsample_add(up: nn.Sequential, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``up(x) + skip`` for a decoder step ``up`` = (1x1 ConvOnly, Upsample). CPU float32 inference of contiguous
    3D maps runs the upsampling and the add as one numba pass (``upsample2_add``: 93 -> 28 ms at
    32 x 64 x 72 x 152 on a 2-core EPYC, where PyTorch's CPU trilinear upsampling is slow); otherwise the modules
    and ``+``."""
    conv, upsample = up
    x = conv(x)
    doubled = x.dim() == 5 and skip.shape == (*x.shape[:2], *(2 * s for s in x.shape[2:]))
    kernels = cpu_layer_kernels(x, skip) if doubled and x.is_contiguous() and skip.is_contiguous() else None
    if kernels is not None:
        return torch.from_numpy(kernels.upsample2_add(x.numpy(), skip.numpy()))
    return upsample(x) + skip


class LightMUNet(nn.Module):
    """LightM-UNet; input (B, in_channels, *spatial), output logits (B, out_channels, *spatial)."""

    def __init__(self, spatial_dims: int = 3, init_filters: int = 8, in_channels: int = 1, out_channels: int = 2,
                 dropout_prob: float | None = None, num_groups: int = 8, use_conv_final: bool = True,
                 blocks_down: tuple[int, ...] = (1, 2, 2, 4), blocks_up: tuple[int, ...] = (1, 1, 1)) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError("blocks_up needs one entry per downsampling step (len(blocks_down) - 1)")
        self.arch_config = {"spatial_dims": spatial_dims, "init_filters": init_filters, "in_channels": in_channels,
                            "out_channels": out_channels, "dropout_prob": dropout_prob, "num_groups": num_groups,
                            "use_conv_final": use_conv_final, "blocks_down": list(blocks_down),
                            "blocks_up": list(blocks_up)}
        self.spatial_dims = spatial_dims
        self.init_filters = init_filters
        self.in_channels = in_channels
        self.blocks_down = tuple(blocks_down)
        self.blocks_up = tuple(blocks_up)
        self.dropout_prob = dropout_prob
        self.use_conv_final = use_conv_final
        self.stride = 2 ** (len(blocks_down) - 1)
        self.convInit = dwconv(spatial_dims, in_channels, init_filters)
        self.down_layers = nn.ModuleList()
        for i, n in enumerate(blocks_down):
            ch = init_filters * 2 ** i
            down = mamba_layer(spatial_dims, ch // 2, ch, stride=2) if i > 0 else nn.Identity()
            self.down_layers.append(nn.Sequential(down, *[ResMambaBlock(spatial_dims, ch, num_groups) for _ in range(n)]))
        self.up_layers, self.up_samples = nn.ModuleList(), nn.ModuleList()
        for i, n in enumerate(blocks_up):
            ch = init_filters * 2 ** (len(blocks_up) - i)
            self.up_layers.append(nn.Sequential(*[ResUpBlock(spatial_dims, ch // 2, num_groups) for _ in range(n)]))
            self.up_samples.append(nn.Sequential(ConvOnly(spatial_dims, ch, ch // 2, 1), Upsample(spatial_dims)))
        self.conv_final = nn.Sequential(WideGroupNorm(num_groups, init_filters), nn.ReLU(),
                                        dwconv(spatial_dims, init_filters, out_channels, kernel_size=1, bias=True))
        if dropout_prob is not None:
            self.dropout = (nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d)(dropout_prob)

    def mamba_layers(self) -> Iterator[tuple[int, MambaLayer]]:
        """(resolution level, layer) of every Mamba layer; level k scans tokens at 1/2^k of the input size.

        The downsampling layer that opens encoder stage i > 0 scans at level i - 1 (it pools after); the
        residual blocks of stage i at level i. The decoder has no Mamba layers.
        """
        for i, stage in enumerate(self.down_layers):
            for j, block in enumerate(stage):
                level = i - 1 if i > 0 and j == 0 else i
                for m in block.modules():
                    if isinstance(m, MambaLayer):
                        yield level, m

    def set_activation_checkpointing(self, levels: bool | int | Sequence[int] = True,
                                     mode: str = "layer") -> "LightMUNet":
        """Recompute the Mamba layers at these resolution levels in backward instead of storing their activations.

        ``True``: levels 0 and 1 (full and half resolution, where nearly all activation memory is);
        ``False`` / ``()``: off (the default); an int or ints: those levels. ``mode`` is
        :class:`MambaLayer`'s ``checkpointing`` ("layer" or "cheap"). Only training-mode forwards with
        grad enabled are affected; outputs, gradients and the state dict are unchanged. Returns ``self``.

        Measured (H200, 2026-11-26 session 10, 3D 128^3 batch 2 bf16-autocast training step of the official-size
        net, Triton scan and layer ops): off 31.8 GiB peak / 363 ms; "layer" at level 0: 17.7 GiB / 394 ms; at
        levels 0, 1: 12.1 GiB / 414 ms; "cheap" at levels 0, 1: 24.2 GiB / 376 ms.
        """
        if mode not in MambaLayer.CHECKPOINT_MODES:
            raise ValueError(f"mode must be one of {MambaLayer.CHECKPOINT_MODES}, not {mode!r}")
        if isinstance(levels, bool):
            chosen = {0, 1} if levels else set()
        elif isinstance(levels, int):
            chosen = {levels}
        else:
            chosen = {int(v) for v in levels}
        for level, layer in self.mamba_layers():
            layer.checkpointing = mode if level in chosen else None
        return self

    @property
    def activation_checkpointing(self) -> dict[int, str]:
        """{level: mode} of the resolution levels whose Mamba layers are checkpointed (empty when off)."""
        return {level: layer.checkpointing for level, layer in self.mamba_layers() if layer.checkpointing}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [s for s in x.shape[2:] if s % self.stride]
        if x.dim() != self.spatial_dims + 2 or bad:
            raise ValueError(f"LightMUNet expects (B, C) + {self.spatial_dims} spatial axes, each "
                             f"divisible by {self.stride}; got {tuple(x.shape)}")
        x = self.convInit(x)
        if self.dropout_prob is not None:
            x = self.dropout(x)
        skips = []
        for down in self.down_layers:
            x = down(x)
            skips.append(x)
        skips.reverse()
        for i, (up, layer) in enumerate(zip(self.up_samples, self.up_layers)):
            x = layer(upsample_add(up, x, skips[i + 1]))
        if not self.use_conv_final:
            return x
        norm, _, conv = self.conv_final  # GroupNorm, ReLU, 1x1 convolution
        return conv(norm_relu(norm, x))


def warm_cpu_kernels() -> bool:
    """Compile, or load from numba's on-disk cache, the numba kernels of LightM-UNet's CPU inference: a forward
    pass of a small 3D LightM-UNet and one depthwise convolution on a tiny map.

    On the first CPU run after installing they compile in about 10 s on 2 cores (1 s to load later); a GUI calls
    this in a background thread when it opens, so a user's first segmentation does not wait for it. Returns False
    (and changes nothing) where the fast paths do not apply (numba missing, ``MEDMAMBA_CPU_LAYERS=0``).
    """
    x = torch.zeros(1, 1, 16, 16, 16)
    with torch.inference_mode():
        net = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2).eval()
        kernels = cpu_layer_kernels(x, net.convInit[0].conv.weight)
        if kernels is None:
            return False
        net(x)
        kernels.depthwise_conv3d_3(torch.zeros(1, 1, 2, 2, 2).numpy(), torch.zeros(1, 3, 3, 3).numpy())
    return True
