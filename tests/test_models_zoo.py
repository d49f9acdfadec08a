"""Every registered model: contract sanity, forward and backward on CPU at a small input size."""

from __future__ import annotations

import re

import pytest
import torch

from napari_medmamba.models import REGISTRY, build_model, get_model_spec

SMALL = {2: {"lightm_unet_2d": (8, 16), "mhs_vm_2d": (32, 32)}, 3: {"lightm_unet_3d": (8, 8, 8),
                                                                      "unet_3d": (8, 16, 8),
                                                                      "unet_3d_hn_oar": (8, 16, 8)}}


def test_expected_models_registered() -> None:
    assert {"lightm_unet_3d", "lightm_unet_2d", "mhs_vm_2d", "unet_3d"} <= set(REGISTRY)
    with pytest.raises(KeyError, match="lightm_unet_3d"):
        build_model("no_such_model")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_contract(name: str) -> None:
    spec = get_model_spec(name)
    c = spec.contract
    assert c.label_names[0] == "background" and len(c.label_colors) == c.num_classes
    assert all(re.fullmatch(r"#[0-9a-f]{6}", col) for col in c.label_colors)
    assert len(set(c.label_colors)) == c.num_classes
    assert len(c.patch_size) == c.spatial_dims
    model = build_model(name)
    assert all(s % model.stride == 0 for s in c.patch_size), (c.patch_size, model.stride)
    if spec.weights is not None:  # shipped weights: present, hashed, with a card that matches the registry
        from napari_medmamba.models import WEIGHTS_DIR, sha256_file

        assert sha256_file(WEIGHTS_DIR / spec.weights) == spec.sha256
        assert spec.card["weights_sha256"] == spec.sha256 and spec.card["weights_file"] == spec.weights
        assert [lab["name"] for lab in spec.card["labels"]] == list(c.label_names)
        assert spec.card["intended_use"].startswith("Research only")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    spec = get_model_spec(name)
    c = spec.contract
    spatial = SMALL[c.spatial_dims].get(name) or tuple(8 for _ in range(c.spatial_dims))
    model = build_model(name).train()
    x = torch.randn(2, c.in_channels, *spatial)
    y = model(x)
    assert y.shape == (2, c.num_classes, *spatial)
    assert torch.isfinite(y).all()
    target = torch.randint(0, c.num_classes, (2, *spatial))
    torch.nn.functional.cross_entropy(y, target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert bad == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert len(zero) <= 0.05 * len(list(model.parameters())), zero


@pytest.mark.parametrize("name,key,expected", [("lightm_unet_3d", "init_filters", 16),
                                               ("unet_3d", "features", [16, 32, 64, 128]),
                                               ("mhs_vm_2d", "dims", [16, 32, 64, 128])])
def test_build_model_width(name: str, key: str, expected) -> None:
    narrow = build_model(name, width=16)
    assert narrow.arch_config[key] == expected
    assert type(narrow) is type(build_model(name))
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in build_model(name).parameters())
    with pytest.raises(ValueError, match="positive"):
        build_model(name, width=0)


def test_registered_name_loads_weights_of_another_width(tmp_path) -> None:
    """Weights trained with --width load under the registered name at their own widths (quality.py --weights)."""
    from napari_medmamba.models import load_checkpoint, save_weights

    src = build_model("lightm_unet_3d", width=8)
    path = save_weights(src, tmp_path / "w8.safetensors")
    loaded = load_checkpoint(path, name="lightm_unet_3d")
    assert loaded.arch_config["init_filters"] == 8
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src.eval()(x))
