"""LightM-UNet: official checkpoint layout, sizes and input checks."""

from __future__ import annotations

import pytest
import torch

from napari_medmamba.models.lightm_unet import LightMUNet

# Official nnU-Net v2 LightM-UNet 3D network (nnUNetTrainerLightMUNet: init_filters 32, blocks_down
# (1, 2, 2, 4), blocks_up (1, 1, 1)) with 1 input channel and 3 classes: every state-dict key and its
# shape, as the official nnunetv2/nets/LightMUNet.py (MONAI 1.3.0 blocks, mamba_ssm Mamba) creates them.
OFFICIAL_3D_MANIFEST = """
convInit.0.conv.weight 1x1x3x3x3
convInit.1.conv.weight 32x1x1x1x1
down_layers.0.1.norm1.weight 32
down_layers.0.1.norm1.bias 32
down_layers.0.1.norm2.weight 32
down_layers.0.1.norm2.bias 32
down_layers.0.1.conv1.skip_scale 1
down_layers.0.1.conv1.norm.weight 32
down_layers.0.1.conv1.norm.bias 32
down_layers.0.1.conv1.mamba.A_log 64x16
down_layers.0.1.conv1.mamba.D 64
down_layers.0.1.conv1.mamba.in_proj.weight 128x32
down_layers.0.1.conv1.mamba.conv1d.weight 64x1x4
down_layers.0.1.conv1.mamba.conv1d.bias 64
down_layers.0.1.conv1.mamba.x_proj.weight 34x64
down_layers.0.1.conv1.mamba.dt_proj.weight 64x2
down_layers.0.1.conv1.mamba.dt_proj.bias 64
down_layers.0.1.conv1.mamba.out_proj.weight 32x64
down_layers.0.1.conv1.proj.weight 32x32
down_layers.0.1.conv1.proj.bias 32
down_layers.0.1.conv2.skip_scale 1
down_layers.0.1.conv2.norm.weight 32
down_layers.0.1.conv2.norm.bias 32
down_layers.0.1.conv2.mamba.A_log 64x16
down_layers.0.1.conv2.mamba.D 64
down_layers.0.1.conv2.mamba.in_proj.weight 128x32
down_layers.0.1.conv2.mamba.conv1d.weight 64x1x4
down_layers.0.1.conv2.mamba.conv1d.bias 64
down_layers.0.1.conv2.mamba.x_proj.weight 34x64
down_layers.0.1.conv2.mamba.dt_proj.weight 64x2
down_layers.0.1.conv2.mamba.dt_proj.bias 64
down_layers.0.1.conv2.mamba.out_proj.weight 32x64
down_layers.0.1.conv2.proj.weight 32x32
down_layers.0.1.conv2.proj.bias 32
down_layers.1.0.0.skip_scale 1
down_layers.1.0.0.norm.weight 32
down_layers.1.0.0.norm.bias 32
down_layers.1.0.0.mamba.A_log 64x16
down_layers.1.0.0.mamba.D 64
down_layers.1.0.0.mamba.in_proj.weight 128x32
down_layers.1.0.0.mamba.conv1d.weight 64x1x4
down_layers.1.0.0.mamba.conv1d.bias 64
down_layers.1.0.0.mamba.x_proj.weight 34x64
down_layers.1.0.0.mamba.dt_proj.weight 64x2
down_layers.1.0.0.mamba.dt_proj.bias 64
down_layers.1.0.0.mamba.out_proj.weight 32x64
down_layers.1.0.0.proj.weight 64x32
down_layers.1.0.0.proj.bias 64
down_layers.1.1.norm1.weight 64
down_layers.1.1.norm1.bias 64
down_layers.1.1.norm2.weight 64
down_layers.1.1.norm2.bias 64
down_layers.1.1.conv1.skip_scale 1
down_layers.1.1.conv1.norm.weight 64
down_layers.1.1.conv1.norm.bias 64
down_layers.1.1.conv1.mamba.A_log 128x16
down_layers.1.1.conv1.mamba.D 128
down_layers.1.1.conv1.mamba.in_proj.weight 256x64
down_layers.1.1.conv1.mamba.conv1d.weight 128x1x4
down_layers.1.1.conv1.mamba.conv1d.bias 128
down_layers.1.1.conv1.mamba.x_proj.weight 36x128
down_layers.1.1.conv1.mamba.dt_proj.weight 128x4
down_layers.1.1.conv1.mamba.dt_proj.bias 128
down_layers.1.1.conv1.mamba.out_proj.weight 64x128
down_layers.1.1.conv1.proj.weight 64x64
down_layers.1.1.conv1.proj.bias 64
down_layers.1.1.conv2.skip_scale 1
down_layers.1.1.conv2.norm.weight 64
down_layers.1.1.conv2.norm.bias 64
down_layers.1.1.conv2.mamba.A_log 128x16
down_layers.1.1.conv2.mamba.D 128
down_layers.1.1.conv2.mamba.in_proj.weight 256x64
down_layers.1.1.conv2.mamba.conv1d.weight 128x1x4
down_layers.1.1.conv2.mamba.conv1d.bias 128
down_layers.1.1.conv2.mamba.x_proj.weight 36x128
down_layers.1.1.conv2.mamba.dt_proj.weight 128x4
down_layers.1.1.conv2.mamba.dt_proj.bias 128
down_layers.1.1.conv2.mamba.out_proj.weight 64x128
down_layers.1.1.conv2.proj.weight 64x64
down_layers.1.1.conv2.proj.bias 64
down_layers.1.2.norm1.weight 64
down_layers.1.2.norm1.bias 64
down_layers.1.2.norm2.weight 64
down_layers.1.2.norm2.bias 64
down_layers.1.2.conv1.skip_scale 1
down_layers.1.2.conv1.norm.weight 64
down_layers.1.2.conv1.norm.bias 64
down_layers.1.2.conv1.mamba.A_log 128x16
down_layers.1.2.conv1.mamba.D 128
down_layers.1.2.conv1.mamba.in_proj.weight 256x64
down_layers.1.2.conv1.mamba.conv1d.weight 128x1x4
down_layers.1.2.conv1.mamba.conv1d.bias 128
down_layers.1.2.conv1.mamba.x_proj.weight 36x128
down_layers.1.2.conv1.mamba.dt_proj.weight 128x4
down_layers.1.2.conv1.mamba.dt_proj.bias 128
down_layers.1.2.conv1.mamba.out_proj.weight 64x128
down_layers.1.2.conv1.proj.weight 64x64
down_layers.1.2.conv1.proj.bias 64
down_layers.1.2.conv2.skip_scale 1
down_layers.1.2.conv2.norm.weight 64
down_layers.1.2.conv2.norm.bias 64
down_layers.1.2.conv2.mamba.A_log 128x16
down_layers.1.2.conv2.mamba.D 128
down_layers.1.2.conv2.mamba.in_proj.weight 256x64
down_layers.1.2.conv2.mamba.conv1d.weight 128x1x4
down_layers.1.2.conv2.mamba.conv1d.bias 128
down_layers.1.2.conv2.mamba.x_proj.weight 36x128
down_layers.1.2.conv2.mamba.dt_proj.weight 128x4
down_layers.1.2.conv2.mamba.dt_proj.bias 128
down_layers.1.2.conv2.mamba.out_proj.weight 64x128
down_layers.1.2.conv2.proj.weight 64x64
down_layers.1.2.conv2.proj.bias 64
down_layers.2.0.0.skip_scale 1
down_layers.2.0.0.norm.weight 64
down_layers.2.0.0.norm.bias 64
down_layers.2.0.0.mamba.A_log 128x16
down_layers.2.0.0.mamba.D 128
down_layers.2.0.0.mamba.in_proj.weight 256x64
down_layers.2.0.0.mamba.conv1d.weight 128x1x4
down_layers.2.0.0.mamba.conv1d.bias 128
down_layers.2.0.0.mamba.x_proj.weight 36x128
down_layers.2.0.0.mamba.dt_proj.weight 128x4
down_layers.2.0.0.mamba.dt_proj.bias 128
down_layers.2.0.0.mamba.out_proj.weight 64x128
down_layers.2.0.0.proj.weight 128x64
down_layers.2.0.0.proj.bias 128
down_layers.2.1.norm1.weight 128
down_layers.2.1.norm1.bias 128
down_layers.2.1.norm2.weight 128
down_layers.2.1.norm2.bias 128
down_layers.2.1.conv1.skip_scale 1
down_layers.2.1.conv1.norm.weight 128
down_layers.2.1.conv1.norm.bias 128
down_layers.2.1.conv1.mamba.A_log 256x16
down_layers.2.1.conv1.mamba.D 256
down_layers.2.1.conv1.mamba.in_proj.weight 512x128
down_layers.2.1.conv1.mamba.conv1d.weight 256x1x4
down_layers.2.1.conv1.mamba.conv1d.bias 256
down_layers.2.1.conv1.mamba.x_proj.weight 40x256
down_layers.2.1.conv1.mamba.dt_proj.weight 256x8
down_layers.2.1.conv1.mamba.dt_proj.bias 256
down_layers.2.1.conv1.mamba.out_proj.weight 128x256
down_layers.2.1.conv1.proj.weight 128x128
down_layers.2.1.conv1.proj.bias 128
down_layers.2.1.conv2.skip_scale 1
down_layers.2.1.conv2.norm.weight 128
down_layers.2.1.conv2.norm.bias 128
down_layers.2.1.conv2.mamba.A_log 256x16
down_layers.2.1.conv2.mamba.D 256
down_layers.2.1.conv2.mamba.in_proj.weight 512x128
down_layers.2.1.conv2.mamba.conv1d.weight 256x1x4
down_layers.2.1.conv2.mamba.conv1d.bias 256
down_layers.2.1.conv2.mamba.x_proj.weight 40x256
down_layers.2.1.conv2.mamba.dt_proj.weight 256x8
down_layers.2.1.conv2.mamba.dt_proj.bias 256
down_layers.2.1.conv2.mamba.out_proj.weight 128x256
down_layers.2.1.conv2.proj.weight 128x128
down_layers.2.1.conv2.proj.bias 128
down_layers.2.2.norm1.weight 128
down_layers.2.2.norm1.bias 128
down_layers.2.2.norm2.weight 128
down_layers.2.2.norm2.bias 128
down_layers.2.2.conv1.skip_scale 1
down_layers.2.2.conv1.norm.weight 128
down_layers.2.2.conv1.norm.bias 128
down_layers.2.2.conv1.mamba.A_log 256x16
down_layers.2.2.conv1.mamba.D 256
down_layers.2.2.conv1.mamba.in_proj.weight 512x128
down_layers.2.2.conv1.mamba.conv1d.weight 256x1x4
down_layers.2.2.conv1.mamba.conv1d.bias 256
down_layers.2.2.conv1.mamba.x_proj.weight 40x256
down_layers.2.2.conv1.mamba.dt_proj.weight 256x8
down_layers.2.2.conv1.mamba.dt_proj.bias 256
down_layers.2.2.conv1.mamba.out_proj.weight 128x256
down_layers.2.2.conv1.proj.weight 128x128
down_layers.2.2.conv1.proj.bias 128
down_layers.2.2.conv2.skip_scale 1
down_layers.2.2.conv2.norm.weight 128
down_layers.2.2.conv2.norm.bias 128
down_layers.2.2.conv2.mamba.A_log 256x16
down_layers.2.2.conv2.mamba.D 256
down_layers.2.2.conv2.mamba.in_proj.weight 512x128
down_layers.2.2.conv2.mamba.conv1d.weight 256x1x4
down_layers.2.2.conv2.mamba.conv1d.bias 256
down_layers.2.2.conv2.mamba.x_proj.weight 40x256
down_layers.2.2.conv2.mamba.dt_proj.weight 256x8
down_layers.2.2.conv2.mamba.dt_proj.bias 256
down_layers.2.2.conv2.mamba.out_proj.weight 128x256
down_layers.2.2.conv2.proj.weight 128x128
down_layers.2.2.conv2.proj.bias 128
down_layers.3.0.0.skip_scale 1
down_layers.3.0.0.norm.weight 128
down_layers.3.0.0.norm.bias 128
down_layers.3.0.0.mamba.A_log 256x16
down_layers.3.0.0.mamba.D 256
down_layers.3.0.0.mamba.in_proj.weight 512x128
down_layers.3.0.0.mamba.conv1d.weight 256x1x4
down_layers.3.0.0.mamba.conv1d.bias 256
down_layers.3.0.0.mamba.x_proj.weight 40x256
down_layers.3.0.0.mamba.dt_proj.weight 256x8
down_layers.3.0.0.mamba.dt_proj.bias 256
down_layers.3.0.0.mamba.out_proj.weight 128x256
down_layers.3.0.0.proj.weight 256x128
down_layers.3.0.0.proj.bias 256
down_layers.3.1.norm1.weight 256
down_layers.3.1.norm1.bias 256
down_layers.3.1.norm2.weight 256
down_layers.3.1.norm2.bias 256
down_layers.3.1.conv1.skip_scale 1
down_layers.3.1.conv1.norm.weight 256
down_layers.3.1.conv1.norm.bias 256
down_layers.3.1.conv1.mamba.A_log 512x16
down_layers.3.1.conv1.mamba.D 512
down_layers.3.1.conv1.mamba.in_proj.weight 1024x256
down_layers.3.1.conv1.mamba.conv1d.weight 512x1x4
down_layers.3.1.conv1.mamba.conv1d.bias 512
down_layers.3.1.conv1.mamba.x_proj.weight 48x512
down_layers.3.1.conv1.mamba.dt_proj.weight 512x16
down_layers.3.1.conv1.mamba.dt_proj.bias 512
down_layers.3.1.conv1.mamba.out_proj.weight 256x512
down_layers.3.1.conv1.proj.weight 256x256
down_layers.3.1.conv1.proj.bias 256
down_layers.3.1.conv2.skip_scale 1
down_layers.3.1.conv2.norm.weight 256
down_layers.3.1.conv2.norm.bias 256
down_layers.3.1.conv2.mamba.A_log 512x16
down_layers.3.1.conv2.mamba.D 512
down_layers.3.1.conv2.mamba.in_proj.weight 1024x256
down_layers.3.1.conv2.mamba.conv1d.weight 512x1x4
down_layers.3.1.conv2.mamba.conv1d.bias 512
down_layers.3.1.conv2.mamba.x_proj.weight 48x512
down_layers.3.1.conv2.mamba.dt_proj.weight 512x16
down_layers.3.1.conv2.mamba.dt_proj.bias 512
down_layers.3.1.conv2.mamba.out_proj.weight 256x512
down_layers.3.1.conv2.proj.weight 256x256
down_layers.3.1.conv2.proj.bias 256
down_layers.3.2.norm1.weight 256
down_layers.3.2.norm1.bias 256
down_layers.3.2.norm2.weight 256
down_layers.3.2.norm2.bias 256
down_layers.3.2.conv1.skip_scale 1
down_layers.3.2.conv1.norm.weight 256
down_layers.3.2.conv1.norm.bias 256
down_layers.3.2.conv1.mamba.A_log 512x16
down_layers.3.2.conv1.mamba.D 512
down_layers.3.2.conv1.mamba.in_proj.weight 1024x256
down_layers.3.2.conv1.mamba.conv1d.weight 512x1x4
down_layers.3.2.conv1.mamba.conv1d.bias 512
down_layers.3.2.conv1.mamba.x_proj.weight 48x512
down_layers.3.2.conv1.mamba.dt_proj.weight 512x16
down_layers.3.2.conv1.mamba.dt_proj.bias 512
down_layers.3.2.conv1.mamba.out_proj.weight 256x512
down_layers.3.2.conv1.proj.weight 256x256
down_layers.3.2.conv1.proj.bias 256
down_layers.3.2.conv2.skip_scale 1
down_layers.3.2.conv2.norm.weight 256
down_layers.3.2.conv2.norm.bias 256
down_layers.3.2.conv2.mamba.A_log 512x16
down_layers.3.2.conv2.mamba.D 512
down_layers.3.2.conv2.mamba.in_proj.weight 1024x256
down_layers.3.2.conv2.mamba.conv1d.weight 512x1x4
down_layers.3.2.conv2.mamba.conv1d.bias 512
down_layers.3.2.conv2.mamba.x_proj.weight 48x512
down_layers.3.2.conv2.mamba.dt_proj.weight 512x16
down_layers.3.2.conv2.mamba.dt_proj.bias 512
down_layers.3.2.conv2.mamba.out_proj.weight 256x512
down_layers.3.2.conv2.proj.weight 256x256
down_layers.3.2.conv2.proj.bias 256
down_layers.3.3.norm1.weight 256
down_layers.3.3.norm1.bias 256
down_layers.3.3.norm2.weight 256
down_layers.3.3.norm2.bias 256
down_layers.3.3.conv1.skip_scale 1
down_layers.3.3.conv1.norm.weight 256
down_layers.3.3.conv1.norm.bias 256
down_layers.3.3.conv1.mamba.A_log 512x16
down_layers.3.3.conv1.mamba.D 512
down_layers.3.3.conv1.mamba.in_proj.weight 1024x256
down_layers.3.3.conv1.mamba.conv1d.weight 512x1x4
down_layers.3.3.conv1.mamba.conv1d.bias 512
down_layers.3.3.conv1.mamba.x_proj.weight 48x512
down_layers.3.3.conv1.mamba.dt_proj.weight 512x16
down_layers.3.3.conv1.mamba.dt_proj.bias 512
down_layers.3.3.conv1.mamba.out_proj.weight 256x512
down_layers.3.3.conv1.proj.weight 256x256
down_layers.3.3.conv1.proj.bias 256
down_layers.3.3.conv2.skip_scale 1
down_layers.3.3.conv2.norm.weight 256
down_layers.3.3.conv2.norm.bias 256
down_layers.3.3.conv2.mamba.A_log 512x16
down_layers.3.3.conv2.mamba.D 512
down_layers.3.3.conv2.mamba.in_proj.weight 1024x256
down_layers.3.3.conv2.mamba.conv1d.weight 512x1x4
down_layers.3.3.conv2.mamba.conv1d.bias 512
down_layers.3.3.conv2.mamba.x_proj.weight 48x512
down_layers.3.3.conv2.mamba.dt_proj.weight 512x16
down_layers.3.3.conv2.mamba.dt_proj.bias 512
down_layers.3.3.conv2.mamba.out_proj.weight 256x512
down_layers.3.3.conv2.proj.weight 256x256
down_layers.3.3.conv2.proj.bias 256
down_layers.3.4.norm1.weight 256
down_layers.3.4.norm1.bias 256
down_layers.3.4.norm2.weight 256
down_layers.3.4.norm2.bias 256
down_layers.3.4.conv1.skip_scale 1
down_layers.3.4.conv1.norm.weight 256
down_layers.3.4.conv1.norm.bias 256
down_layers.3.4.conv1.mamba.A_log 512x16
down_layers.3.4.conv1.mamba.D 512
down_layers.3.4.conv1.mamba.in_proj.weight 1024x256
down_layers.3.4.conv1.mamba.conv1d.weight 512x1x4
down_layers.3.4.conv1.mamba.conv1d.bias 512
down_layers.3.4.conv1.mamba.x_proj.weight 48x512
down_layers.3.4.conv1.mamba.dt_proj.weight 512x16
down_layers.3.4.conv1.mamba.dt_proj.bias 512
down_layers.3.4.conv1.mamba.out_proj.weight 256x512
down_layers.3.4.conv1.proj.weight 256x256
down_layers.3.4.conv1.proj.bias 256
down_layers.3.4.conv2.skip_scale 1
down_layers.3.4.conv2.norm.weight 256
down_layers.3.4.conv2.norm.bias 256
down_layers.3.4.conv2.mamba.A_log 512x16
down_layers.3.4.conv2.mamba.D 512
down_layers.3.4.conv2.mamba.in_proj.weight 1024x256
down_layers.3.4.conv2.mamba.conv1d.weight 512x1x4
down_layers.3.4.conv2.mamba.conv1d.bias 512
down_layers.3.4.conv2.mamba.x_proj.weight 48x512
down_layers.3.4.conv2.mamba.dt_proj.weight 512x16
down_layers.3.4.conv2.mamba.dt_proj.bias 512
down_layers.3.4.conv2.mamba.out_proj.weight 256x512
down_layers.3.4.conv2.proj.weight 256x256
down_layers.3.4.conv2.proj.bias 256
up_layers.0.0.skip_scale 1
up_layers.0.0.norm1.weight 128
up_layers.0.0.norm1.bias 128
up_layers.0.0.norm2.weight 128
up_layers.0.0.norm2.bias 128
up_layers.0.0.conv.0.conv.weight 128x1x3x3x3
up_layers.0.0.conv.1.conv.weight 128x128x1x1x1
up_layers.1.0.skip_scale 1
up_layers.1.0.norm1.weight 64
up_layers.1.0.norm1.bias 64
up_layers.1.0.norm2.weight 64
up_layers.1.0.norm2.bias 64
up_layers.1.0.conv.0.conv.weight 64x1x3x3x3
up_layers.1.0.conv.1.conv.weight 64x64x1x1x1
up_layers.2.0.skip_scale 1
up_layers.2.0.norm1.weight 32
up_layers.2.0.norm1.bias 32
up_layers.2.0.norm2.weight 32
up_layers.2.0.norm2.bias 32
up_layers.2.0.conv.0.conv.weight 32x1x3x3x3
up_layers.2.0.conv.1.conv.weight 32x32x1x1x1
up_samples.0.0.conv.weight 128x256x1x1x1
up_samples.1.0.conv.weight 64x128x1x1x1
up_samples.2.0.conv.weight 32x64x1x1x1
conv_final.0.weight 32
conv_final.0.bias 32
conv_final.2.0.conv.weight 32x1x1x1x1
conv_final.2.0.conv.bias 32
conv_final.2.1.conv.weight 3x32x1x1x1
conv_final.2.1.conv.bias 3
"""


def _manifest() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in OFFICIAL_3D_MANIFEST.strip().splitlines():
        key, shape = line.split()
        out[key] = tuple(int(s) for s in shape.split("x"))
    return out


def test_official_manifest_has_362_tensors() -> None:
    assert len(_manifest()) == 362
    assert len(OFFICIAL_3D_MANIFEST.strip().splitlines()) == 362  # no duplicate lines


def test_3d_state_dict_matches_official_keys_and_shapes() -> None:
    model = LightMUNet(spatial_dims=3, init_filters=32, in_channels=1, out_channels=3)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _manifest()
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


def test_parameter_count_3d_and_2d() -> None:
    m3 = LightMUNet(spatial_dims=3, init_filters=32, in_channels=1, out_channels=3)
    assert sum(p.numel() for p in m3.parameters()) == sum(
        torch.Size(s).numel() for s in _manifest().values()) == 5_015_766
    m2 = LightMUNet(spatial_dims=2, init_filters=32, in_channels=1, out_channels=3)
    sd2 = m2.state_dict()
    assert len(sd2) == 362 and sum(v.numel() for v in sd2.values()) == 5_011_716
    assert sd2["convInit.0.conv.weight"].shape == (1, 1, 3, 3)


def test_rejects_axes_not_divisible_by_8() -> None:
    model = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 8, 12, 8))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 8, 8))  # 2D input to a 3D net


def test_forward_2d_and_3d_shapes_small() -> None:
    torch.manual_seed(0)
    m = LightMUNet(spatial_dims=2, init_filters=8, in_channels=2, out_channels=4).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 2, 16, 8)).shape == (2, 4, 16, 8)
    m3 = LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1),
                    blocks_up=(1,)).eval()
    with torch.no_grad():
        assert m3(torch.randn(1, 1, 4, 6, 2)).shape == (1, 2, 4, 6, 2)


def test_mamba_layer_skip_and_double_norm(monkeypatch) -> None:
    """MambaLayer: proj(norm(mamba(norm(x)) + skip_scale * x)); with a zero Mamba output it is proj(norm(s*x))
    (float32 products: compared at float32 tolerance)."""
    from napari_medmamba.models.lightm_unet import MambaLayer
    from napari_medmamba.models.mamba import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "0")

    torch.manual_seed(0)
    layer = MambaLayer(8, 16).eval()
    torch.nn.init.zeros_(layer.mamba.out_proj.weight)
    with torch.no_grad():
        layer.skip_scale.fill_(2.0)
        x = torch.randn(1, 8, 3, 5)
        flat = x.reshape(1, 8, 15).transpose(1, 2)
        want = layer.proj(layer.norm(2.0 * flat)).transpose(1, 2).reshape(1, 16, 3, 5)
        torch.testing.assert_close(layer(x), want)


# --- activation checkpointing (issue #12) ---------------------------------------------------------------

def _small_net(dtype: torch.dtype = torch.float64) -> LightMUNet:
    torch.manual_seed(0)
    return LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3).to(dtype).train()


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Output of ``model(x)`` and the bytes of the distinct storages autograd saved for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values())


def _out_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["<input>"] = x.grad.clone()
    return out.detach(), grads


def test_activation_checkpointing_levels_api_and_state_dict() -> None:
    from napari_medmamba.models.lightm_unet import MambaLayer

    net = _small_net()
    keys = list(net.state_dict())
    levels = [level for level, _ in net.mamba_layers()]
    assert len(levels) == sum(isinstance(m, MambaLayer) for m in net.modules()) == 2 * 9 + 3
    assert levels.count(0) == 3 and levels.count(1) == 5  # stage 0 (2) + stage 1's downsampling layer; 4 + 1
    assert net.activation_checkpointing == {}
    assert net.set_activation_checkpointing() is net
    assert net.activation_checkpointing == {0: "layer", 1: "layer"}
    assert sum(m.checkpointing is not None for m in net.modules() if isinstance(m, MambaLayer)) == 8
    assert net.set_activation_checkpointing([2, 3], mode="cheap").activation_checkpointing == {2: "cheap", 3: "cheap"}
    assert net.set_activation_checkpointing(0).activation_checkpointing == {0: "layer"}
    assert net.set_activation_checkpointing(False).activation_checkpointing == {}
    with pytest.raises(ValueError, match="mode"):
        net.set_activation_checkpointing(True, mode="everything")
    assert list(net.set_activation_checkpointing(True).state_dict()) == keys


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("mode", ["layer", "cheap"])
def test_activation_checkpointing_same_outputs_and_gradients(mode: str, backend: str, monkeypatch) -> None:
    from napari_medmamba.ssm.dispatch import ENV_VAR, available_backends

    if backend not in available_backends():
        pytest.skip(f"scan backend {backend} unavailable")
    monkeypatch.setenv(ENV_VAR, backend)
    net = _small_net(torch.float64)
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    out_ref, grads_ref = _out_and_grads(net, x)
    net.set_activation_checkpointing(True, mode=mode)
    out, grads = _out_and_grads(net, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_activation_checkpointing_keeps_bf16_autocast_in_recompute() -> None:
    """Recomputation runs under the forward's autocast: bf16 gradients match the uncheckpointed ones."""
    net = _small_net(torch.float32)
    x = torch.randn(1, 1, 16, 16, 16)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _out_and_grads(net, x)

    out_ref, grads_ref = run()
    assert out_ref.dtype == torch.bfloat16  # the head's convolutions ran in bf16
    net.set_activation_checkpointing(True)
    out, grads = run()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for name in grads:  # same ops in the same dtypes; only summation order may differ
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_cuts_saved_for_backward_bytes() -> None:
    """16^3, batch 1, init_filters 8, float32 (measured with the channels-first Mamba layer, which itself keeps
    less than the token-first one did (21.1 MiB): off 18.5 MiB, layer 25%, cheap 76%)."""
    net = _small_net(torch.float32)
    x = torch.randn(1, 1, 16, 16, 16)
    out_off, off = _saved_bytes(net, x)
    out_layer, layer = _saved_bytes(net.set_activation_checkpointing(True, mode="layer"), x)
    out_cheap, cheap = _saved_bytes(net.set_activation_checkpointing(True, mode="cheap"), x)
    out_all, every = _saved_bytes(net.set_activation_checkpointing([0, 1, 2, 3]), x)
    assert off > 16 * 2**20
    assert layer < 0.30 * off
    assert cheap < 0.8 * off
    assert every < layer
    for out in (out_layer, out_cheap, out_all):
        torch.testing.assert_close(out, out_off, rtol=0, atol=0)


def test_activation_checkpointing_inactive_in_eval_and_no_grad(monkeypatch) -> None:
    import napari_medmamba.models.lightm_unet as lm

    calls = []
    real = lm.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "checkpoint", counting)
    net = _small_net(torch.float32)
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval()
    out_off, off = _saved_bytes(net, x)
    net.set_activation_checkpointing(True)
    out_eval, saved_eval = _saved_bytes(net, x)  # eval with grad enabled: unchanged
    with torch.no_grad():
        out_nograd = net.train()(x)
    assert calls == [] and saved_eval == off
    torch.testing.assert_close(out_eval, out_off, rtol=0, atol=0)
    with torch.inference_mode():
        net(x)
    assert calls == []
    net.train()(x)
    assert len(calls) == 8  # one per Mamba layer at levels 0 and 1
    with torch.no_grad():
        torch.testing.assert_close(net.set_activation_checkpointing(False)(x), out_nograd, rtol=0, atol=0)
