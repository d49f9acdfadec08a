"""Every registered model runs end to end through segment() on a small MR-like volume."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medmamba.inference import segment
from napari_medmamba.io.volume import Geometry, Volume
from napari_medmamba.models import get_model_spec, list_models


def _small_mr() -> Volume:
    rng = np.random.default_rng(11)
    array = (rng.gamma(2.0, 40.0, size=(3, 24, 20))).astype(np.float32)  # 3 slices: one batch for 2D models
    return Volume(array, Geometry((1.1, 0.9, 1.3), (3.0, -2.0, 5.0), (1, 0, 0, 0, -1, 0, 0, 0, -1)), modality="MR")


@pytest.mark.parametrize("name", list_models())
def test_registered_model_end_to_end(name: str) -> None:
    volume = _small_mr()
    spec = get_model_spec(name)
    result = segment(volume, name, device="cpu", mode="fast")
    assert result.labels.geometry.isclose(volume.geometry, atol=1e-6) and result.labels.shape == volume.shape
    assert result.model_name == name and result.label_names == spec.contract.label_names
    assert result.probabilities.shape == (spec.contract.num_classes, *volume.shape)
    np.testing.assert_allclose(result.probabilities.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert result.labels.array.max() < spec.contract.num_classes
    if spec.weights is None:
        assert any("random weights" in w for w in result.warnings)
