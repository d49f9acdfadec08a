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


def test_mamba_layer_skip_and_double_norm() -> None:
    """MambaLayer: proj(norm(mamba(norm(x)) + skip_scale * x)); with a zero Mamba output it is proj(norm(s*x))."""
    from napari_medmamba.models.lightm_unet import MambaLayer

    torch.manual_seed(0)
    layer = MambaLayer(8, 16).eval()
    torch.nn.init.zeros_(layer.mamba.out_proj.weight)
    with torch.no_grad():
        layer.skip_scale.fill_(2.0)
        x = torch.randn(1, 8, 3, 5)
        flat = x.reshape(1, 8, 15).transpose(1, 2)
        want = layer.proj(layer.norm(2.0 * flat)).transpose(1, 2).reshape(1, 16, 3, 5)
        torch.testing.assert_close(layer(x), want)
