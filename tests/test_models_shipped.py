"""Shipped weights are loaded only when their sha256 matches the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_medmamba.models import (WeightsIntegrityError, build_model, get_model_spec, load_registered_model,
                                    save_weights, sha256_file)
from napari_medmamba.models import shipped


@pytest.fixture()
def spec_with_weights(tmp_path, monkeypatch):
    spec = get_model_spec("unet_3d")
    net = build_model("unet_3d")
    path = save_weights(net, tmp_path / "unet.safetensors", {"model": "unet_3d"})
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    return dataclasses.replace(spec, weights=path.name, sha256=sha256_file(path)), net


def test_matching_sha256_loads_the_weights(spec_with_weights) -> None:
    spec, net = spec_with_weights
    loaded = load_registered_model(spec)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_altered_file_is_refused_with_both_hashes(spec_with_weights) -> None:
    spec, _ = spec_with_weights
    path = shipped.WEIGHTS_DIR / spec.weights
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match=spec.sha256):
        load_registered_model(spec)


def test_missing_file_and_missing_hash_are_refused(spec_with_weights) -> None:
    spec, _ = spec_with_weights
    with pytest.raises(WeightsIntegrityError, match="registry has no sha256"):
        load_registered_model(dataclasses.replace(spec, sha256=None))
    with pytest.raises(WeightsIntegrityError, match="missing"):
        load_registered_model(dataclasses.replace(spec, weights="nope.safetensors"))
