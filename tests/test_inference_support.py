"""Tiny networks and contracts shared by the inference-engine tests (no tests here; fast on 2 CPU cores)."""

from __future__ import annotations

import torch
import torch.nn as nn

from napari_medmamba.models.registry import InputContract

NAMES = ("background", "bright")
COLORS = ("#000000", "#ff0000")


class ThresholdNet(nn.Module):
    """Pointwise: class 1 where the normalised intensity exceeds ``threshold`` (a 1x1 convolution)."""

    def __init__(self, spatial_dims: int = 3, threshold: float = 0.0, gain: float = 20.0) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.head = conv(1, 2, kernel_size=1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[1].fill_(gain)
            self.head.bias.copy_(torch.tensor([0.0, -gain * threshold]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class TinyUNet(nn.Module):
    """Conv -> stride-2 conv -> upsample -> conv head; seeded random weights; stride 2."""

    def __init__(self, spatial_dims: int = 3, classes: int = 2, width: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.stride = 2
        self.enc = nn.Sequential(conv(1, width, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(conv(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = conv(2 * width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        return self.head(torch.cat([skip, self.up(self.down(skip))], dim=1))


def contract(spatial_dims: int = 3, patch=(16, 16, 16), orientation: str | None = "RAS", target_spacing=None,
             normalization: str = "zscore", classes: int = 2, **kw) -> InputContract:
    names = NAMES if classes == 2 else tuple(f"c{i}" for i in range(classes))
    colors = COLORS if classes == 2 else tuple("#000000" for _ in range(classes))
    return InputContract(spatial_dims=spatial_dims, in_channels=kw.pop("in_channels", 1), label_names=names,
                         label_colors=colors, patch_size=tuple(patch), target_spacing=target_spacing,
                         orientation=orientation, normalization=normalization, **kw)
