"""A plain U-Net baseline (nnU-Net style: two conv-norm-LeakyReLU per stage, strided-conv downsampling,
transposed-conv upsampling, concatenated skips), sized to be comparable with LightM-UNet."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["UNet"]


class ConvBlock(nn.Sequential):
    """Two (conv 3, InstanceNorm, LeakyReLU) units; the first may be strided."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, stride: int = 1) -> None:
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        super().__init__(conv(in_ch, out_ch, 3, stride=stride, padding=1), norm(out_ch, affine=True),
                         nn.LeakyReLU(0.01, inplace=True),
                         conv(out_ch, out_ch, 3, padding=1), norm(out_ch, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class UNet(nn.Module):
    """(B, in_channels, *spatial) -> logits (B, out_channels, *spatial); axes divisible by 2**(levels-1)."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 features: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        self.arch_config = {"spatial_dims": spatial_dims, "in_channels": in_channels,
                            "out_channels": out_channels, "features": list(features)}
        self.spatial_dims = spatial_dims
        self.stride = 2 ** (len(features) - 1)
        up = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.encoder = nn.ModuleList([ConvBlock(spatial_dims, in_channels, features[0])])
        for a, b in zip(features[:-1], features[1:]):
            self.encoder.append(ConvBlock(spatial_dims, a, b, stride=2))
        self.upsamples = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for a, b in zip(features[:0:-1], features[-2::-1]):
            self.upsamples.append(up(a, b, kernel_size=2, stride=2))
            self.decoder.append(ConvBlock(spatial_dims, 2 * b, b))
        self.head = conv(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or any(s % self.stride for s in x.shape[2:]):
            raise ValueError(f"UNet expects (B, C) + {self.spatial_dims} spatial axes, each divisible by "
                             f"{self.stride}; got {tuple(x.shape)}")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.upsamples, self.decoder, skips[-2::-1]):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)
