"""Weights files cannot run code (issue #14).

``load_checkpoint`` refusing a malicious pickle is tested in tests/test_checkpoints.py
(test_malicious_pickle_refused_and_not_run) and the sha256 check of shipped safetensors
in tests/test_models_shipped.py. Here the same is checked through
``load_registered_model``, the path the GUI, the CLI and ``segment(volume, name)`` use:
a pickle put in place of the shipped weights is refused by the sha256 check before it is
opened, and even with a matching registry hash (a tampered install) it is refused by
``torch.load(weights_only=True)`` without running.
"""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path

import pytest
import torch

from napari_medmamba.models import (CheckpointError, WeightsIntegrityError, get_model_spec, load_registered_model,
                                    sha256_file)
from napari_medmamba.models import shipped


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture()
def evil_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "marker.txt"
    spec = get_model_spec("lightm_unet_3d")
    path = tmp_path / spec.weights  # the shipped file name, replaced by a pickle
    torch.save({"network_weights": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    return spec, path, marker


def test_replaced_shipped_weights_are_refused_by_hash_before_opening(evil_weights) -> None:
    spec, path, marker = evil_weights
    with pytest.raises(WeightsIntegrityError, match="does not match"):
        load_registered_model(spec)
    assert not marker.exists()


def test_malicious_pickle_with_a_matching_hash_is_refused_and_not_run(evil_weights) -> None:
    spec, path, marker = evil_weights
    tampered = dataclasses.replace(spec, sha256=sha256_file(path))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_registered_model(tampered)
    assert not marker.exists()


def test_segment_by_name_goes_through_the_checks(evil_weights) -> None:
    import numpy as np

    from napari_medmamba.inference import segment

    spec, _, marker = evil_weights
    volume = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    with pytest.raises(WeightsIntegrityError):
        segment(volume, spec.name, device="cpu")
    assert not marker.exists()
