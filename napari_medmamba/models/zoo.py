"""The registered models: names, factories, input contracts and, where trained, shipped weights + cards."""

from __future__ import annotations

import json

import torch.nn as nn

from .lightm_unet import LightMUNet
from .mhs_vm import MHSVM
from .registry import WEIGHTS_DIR, InputContract, ModelSpec, get_model_spec, register
from .unet import UNet

__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "build_model", "default_model_name", "HIPPOCAMPUS_LABELS",
           "HIPPOCAMPUS_COLORS"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"LightMUNet": LightMUNet, "MHSVM": MHSVM, "UNet": UNet}
"""Network classes by name (the ``arch`` entry of our safetensors metadata)."""

HIPPOCAMPUS_LABELS = ("background", "anterior hippocampus", "posterior hippocampus")
HIPPOCAMPUS_COLORS = ("#000000", "#ff7f0e", "#1f77b4")
_PATCH_3D = (40, 56, 40)  # (z, y, x), each divisible by 8
_MR = {"in_channels": 1, "label_names": HIPPOCAMPUS_LABELS, "label_colors": HIPPOCAMPUS_COLORS,
       "target_spacing": (1.0, 1.0, 1.0), "modality": "MR", "normalization": "zscore"}


DEFAULT_MODEL = "lightm_unet_3d"
"""The model used when none is named (README main command, CLI, napari widget)."""


def default_model_name() -> str:
    """Name of the default registered model."""
    return DEFAULT_MODEL


def build_model(name: str) -> nn.Module:
    """A freshly initialised network for the registered model ``name`` (no weights loaded)."""
    return get_model_spec(name).factory()


def _lightm(spatial_dims: int) -> nn.Module:
    return LightMUNet(spatial_dims=spatial_dims, init_filters=32, in_channels=1, out_channels=3,
                      blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def _card(file_name: str) -> dict:
    """A shipped model card (JSON beside the weights); empty when the file is absent."""
    path = WEIGHTS_DIR / file_name
    return json.loads(path.read_text()) if path.is_file() else {}


register(ModelSpec(
    name="lightm_unet_3d", factory=lambda: _lightm(3),
    contract=InputContract(spatial_dims=3, patch_size=_PATCH_3D, **_MR),
    description="LightM-UNet 3D (widths 32/64/128/256, as the official nnU-Net v2 trainer builds it); "
                "hippocampus (anterior/posterior) on 1 mm MR.",
    weights="lightm_unet_3d_hippocampus.safetensors",
    sha256="d4c665f031827252492a8856e7b2d207a87e1df57cb52e8a2bd003f63df720d2",
    card=_card("lightm_unet_3d_hippocampus.json")))
register(ModelSpec(
    name="lightm_unet_2d", factory=lambda: _lightm(2),
    contract=InputContract(spatial_dims=2, patch_size=(56, 40), slice_axis=0, **_MR),
    description="LightM-UNet 2D applied slice by slice along z; hippocampus on 1 mm MR."))
register(ModelSpec(
    name="mhs_vm_2d",
    factory=lambda: MHSVM(in_chans=1, num_classes=3, depths=(2, 2, 2, 2), depths_decoder=(2, 2, 2, 1),
                          dims=(96, 192, 384, 768), head_num=4, gfu_t=0.0, drop_path_rate=0.2),
    contract=InputContract(spatial_dims=2, patch_size=(64, 64), slice_axis=0, **_MR),
    description="MHS-VM (VM-UNet with 4-head C/X/S/Z multi-head scanning), slice by slice along z; "
                "hippocampus on 1 mm MR."))
register(ModelSpec(
    name="unet_3d", factory=lambda: UNet(spatial_dims=3, in_channels=1, out_channels=3, features=(32, 64, 128, 256)),
    contract=InputContract(spatial_dims=3, patch_size=_PATCH_3D, **_MR),
    description="Plain 3D U-Net baseline (widths 32/64/128/256) of a budget comparable to LightM-UNet 3D."))
