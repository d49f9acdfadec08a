"""The registered models: names, factories, input contracts and, where trained, shipped weights + cards."""

from __future__ import annotations

import json

import torch.nn as nn

from .lightm_unet import LightMUNet
from .mhs_vm import MHSVM
from .registry import WEIGHTS_DIR, InputContract, ModelSpec, get_model_spec, register
from .unet import UNet

__all__ = ["ARCHITECTURES", "DEFAULT_CT_MODEL", "DEFAULT_MODEL", "HN_OAR_COLORS", "HN_OAR_LABELS",
           "HN_OAR_LARGEST_COMPONENT", "HIPPOCAMPUS_COLORS", "HIPPOCAMPUS_LABELS", "build_model", "default_model_name"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"LightMUNet": LightMUNet, "MHSVM": MHSVM, "UNet": UNet}
"""Network classes by name (the ``arch`` entry of our safetensors metadata)."""

HIPPOCAMPUS_LABELS = ("background", "anterior hippocampus", "posterior hippocampus")
HIPPOCAMPUS_COLORS = ("#000000", "#ff7f0e", "#1f77b4")
_PATCH_3D = (40, 56, 40)  # (z, y, x), each divisible by 8
_MIRROR_LR = (2,)
"""Test-time mirroring (``segment(mirror=True)``) left-right (x in RAS) for the 3D hippocampus models: +0.003
mean Dice on the 44 validation cases (LightM-UNet 0.8786 -> 0.8818) at 1.5-1.7x the time (2-core CPU 0.38-0.48 ->
0.64-0.70 s per case, the tile and its mirror image as one batch); mirroring along y or z as well swaps anterior
and posterior and costs 0.04 (docs/training.md)."""
_MR = {"in_channels": 1, "label_names": HIPPOCAMPUS_LABELS, "label_colors": HIPPOCAMPUS_COLORS,
       "target_spacing": (1.0, 1.0, 1.0), "modality": "MR", "normalization": "zscore"}


HN_OAR_LABELS = ("background", "brainstem", "spinal cord", "right parotid", "left parotid", "esophagus", "larynx",
                 "mandible")
HN_OAR_COLORS = ("#000000", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f0e68c")
_CT_HN = {"in_channels": 1, "label_names": HN_OAR_LABELS, "label_colors": HN_OAR_COLORS,
          "target_spacing": (2.5, 4.0, 4.0), "modality": "CT", "normalization": "ct",
          # 0.5/99.5 percentiles of organ voxels in 40 OpenKBP cases, then their mean/std (nnU-Net's CT scheme)
          "ct_window": (-990.0, 1550.0), "ct_stats": (152.2, 394.4),
          "lr_label_pairs": ((3, 4),),  # right and left parotid
          "body_threshold_hu": -500.0,  # tile only the body's box: 2-4x less work than the whole field of view
          "max_tile_growth": 1.0}  # up to 128 slices as one tile instead of three overlapping windows of 64
_PATCH_CT = (64, 128, 128)  # 160 x 512 x 512 mm: the whole head-and-neck field of view in-plane
HN_OAR_LARGEST_COMPONENT = (1, 3, 4, 6, 7)
"""Recommended clean-up of the head-and-neck models: keep the largest connected component of brainstem,
both parotids, larynx and mandible; not the spinal cord (a cord predicted in pieces would lose all but one) nor
the esophagus. Chosen on the OpenKBP validation cases with the weights trained before the left-right flip fix
(parotid HD95 ~105 mm -> 14-28 mm); with the current weights it changes the mean Dice by < 0.001
(docs/training.md)."""

DEFAULT_MODEL = "lightm_unet_3d"
"""The model used when none is named (README main command, CLI, napari widget)."""
DEFAULT_CT_MODEL = "lightm_unet_3d_hn_oar"
"""The default model for CT scans (head-and-neck organs at risk)."""


def default_model_name() -> str:
    """Name of the default registered model."""
    return DEFAULT_MODEL


_WIDTH_KEY = {"LightMUNet": "init_filters", "UNet": "features", "MHSVM": "dims"}
"""The architecture-config entry that sets each network's widths (an int, or one width per level)."""


def build_model(name: str, width: int | None = None) -> nn.Module:
    """A freshly initialised network for the registered model ``name`` (no weights loaded).

    ``width``: the first level's channels instead of the registered ones (each further level doubles them, as in
    every registered network); the input contract stays the registered model's.
    """
    model = get_model_spec(name).factory()
    if width is None:
        return model
    if width < 1:
        raise ValueError(f"width must be a positive number of channels, not {width}")
    arch = type(model).__name__
    config = dict(getattr(model, "arch_config", None) or {})
    key = _WIDTH_KEY.get(arch)
    if key is None or key not in config:
        raise ValueError(f"model {name!r} ({arch}) has no adjustable width")
    old = config[key]
    config[key] = width if isinstance(old, int) else [width * 2 ** i for i in range(len(old))]
    return type(model)(**config)


def _lightm(spatial_dims: int, out_channels: int = 3) -> nn.Module:
    return LightMUNet(spatial_dims=spatial_dims, init_filters=32, in_channels=1, out_channels=out_channels,
                      blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def _card(file_name: str) -> dict:
    """A shipped model card (JSON beside the weights); empty when the file is absent."""
    path = WEIGHTS_DIR / file_name
    return json.loads(path.read_text()) if path.is_file() else {}


register(ModelSpec(
    name="lightm_unet_3d", factory=lambda: _lightm(3),
    contract=InputContract(spatial_dims=3, patch_size=_PATCH_3D, mirror_axes=_MIRROR_LR, **_MR),
    description="LightM-UNet 3D (widths 32/64/128/256, as the official nnU-Net v2 trainer builds it); "
                "hippocampus (anterior/posterior) on 1 mm MR.",
    weights="lightm_unet_3d_hippocampus.safetensors",
    sha256="24119671b31c7b42e3f1de925e8b5c831bd3a47928b03566140856c37eeaf752",
    card=_card("lightm_unet_3d_hippocampus.json")))
register(ModelSpec(
    name="lightm_unet_2d", factory=lambda: _lightm(2),
    contract=InputContract(spatial_dims=2, patch_size=(56, 40), slice_axis=0, **_MR),
    description="LightM-UNet 2D applied slice by slice along z; hippocampus on 1 mm MR."))
register(ModelSpec(
    name="mhs_vm_2d",
    factory=lambda: MHSVM(in_chans=1, num_classes=3, depths=(2, 2, 2, 2), depths_decoder=(2, 2, 2, 1),
                          dims=(48, 96, 192, 384), head_num=4, gfu_t=0.0, drop_path_rate=0.1),
    contract=InputContract(spatial_dims=2, patch_size=(64, 64), slice_axis=0, **_MR),
    description="MHS-VM (VM-UNet with 4-head C/X/S/Z multi-head scanning, widths 48/96/192/384: half the official "
                "96/192/384/768), slice by slice along z; hippocampus on 1 mm MR.",
    weights="mhs_vm_2d_hippocampus.safetensors",
    sha256="d5e2f02eaa0c5bd95193cfabd76315fbfe95cfc91ae30acf58817d6d0662332c",
    card=_card("mhs_vm_2d_hippocampus.json")))
register(ModelSpec(
    name="unet_3d", factory=lambda: UNet(spatial_dims=3, in_channels=1, out_channels=3, features=(32, 64, 128, 256)),
    contract=InputContract(spatial_dims=3, patch_size=_PATCH_3D, mirror_axes=_MIRROR_LR, **_MR),
    description="Plain 3D U-Net baseline (widths 32/64/128/256) of a budget comparable to LightM-UNet 3D."))
register(ModelSpec(
    name="lightm_unet_3d_hn_oar", factory=lambda: _lightm(3, len(HN_OAR_LABELS)),
    contract=InputContract(spatial_dims=3, patch_size=_PATCH_CT,
                           largest_component_classes=HN_OAR_LARGEST_COMPONENT, **_CT_HN),
    description="LightM-UNet 3D (widths 32/64/128/256); head-and-neck organs at risk on CT (OpenKBP), "
                "2.5 x 4 x 4 mm working grid, only the body's box segmented. Below its accuracy target: see the model card.",
    weights="lightm_unet_3d_hn_oar.safetensors",
    sha256="446cff5101096c281051d7fb8c312983a09e9fb83df35d03710d9468692303a2",
    card=_card("lightm_unet_3d_hn_oar.json")))
register(ModelSpec(
    name="unet_3d_hn_oar",
    factory=lambda: UNet(spatial_dims=3, in_channels=1, out_channels=len(HN_OAR_LABELS), features=(32, 64, 128, 256)),
    contract=InputContract(spatial_dims=3, patch_size=_PATCH_CT,
                           largest_component_classes=HN_OAR_LARGEST_COMPONENT, **_CT_HN),
    description="Plain 3D U-Net baseline for the head-and-neck CT model (same recipe and budget)."))
