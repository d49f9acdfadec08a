"""Largest component, hole filling and small-island removal on crafted label maps."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medmamba.inference.postprocessing import (
    Postprocess,
    apply_postprocess,
    fill_holes,
    keep_largest_component,
    remove_small_islands,
)


def _two_classes_with_islands() -> np.ndarray:
    labels = np.zeros((10, 12, 12), np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # 64 voxels
    labels[7:9, 8:10, 8:10] = 1  # 8 voxels
    labels[6:9, 1:4, 1:4] = 2  # 27 voxels
    labels[1, 10, 10] = 2  # 1 voxel
    return labels


def test_keep_largest_component_per_class() -> None:
    labels = _two_classes_with_islands()
    out = keep_largest_component(labels)
    assert np.count_nonzero(out == 1) == 64 and np.count_nonzero(out == 2) == 27
    assert out[8, 9, 9] == 0 and out[1, 10, 10] == 0
    only_two = keep_largest_component(labels, classes=(2,))
    assert np.count_nonzero(only_two == 1) == 72 and np.count_nonzero(only_two == 2) == 27
    assert labels[8, 9, 9] == 1  # input untouched


def test_diagonal_neighbours_are_one_component() -> None:
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = labels[2, 2, 2] = 1
    np.testing.assert_array_equal(keep_largest_component(labels), labels)


def test_fill_holes_fills_enclosed_background_only() -> None:
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[3:6, 3:6, 3:6] = 0  # enclosed cavity
    labels[4, 4, 4] = 2  # another class inside the cavity stays
    labels[0:4, 7, 7] = 0  # a notch open to the outside stays open
    out = fill_holes(labels)
    assert np.count_nonzero(out[3:6, 3:6, 3:6] == 1) == 26 and out[4, 4, 4] == 2
    assert (out[0:4, 7, 7] == 0).all()


def test_remove_small_islands() -> None:
    labels = _two_classes_with_islands()
    out = remove_small_islands(labels, min_voxels=8)
    assert np.count_nonzero(out == 1) == 72 and np.count_nonzero(out == 2) == 27  # 8 voxels is kept
    out = remove_small_islands(labels, min_voxels=9)
    assert np.count_nonzero(out == 1) == 64 and np.count_nonzero(out == 2) == 27


def test_apply_postprocess_converts_millilitres() -> None:
    labels = _two_classes_with_islands()
    cleaned = apply_postprocess(labels, Postprocess(min_island_ml=0.016), voxel_volume_ml=0.002)  # 8 voxels
    assert np.count_nonzero(cleaned == 1) == 72 and cleaned[1, 10, 10] == 0
    np.testing.assert_array_equal(apply_postprocess(labels, Postprocess(), 1.0), labels)


def _hn_organs_in_pieces() -> np.ndarray:
    """A right parotid (3) with a stray blob far away and a spinal cord (2) predicted in two pieces."""
    labels = np.zeros((24, 16, 16), np.uint8)
    labels[2:6, 2:6, 2:6] = 3  # the gland, 64 voxels
    labels[2:4, 12:14, 12:14] = 3  # a false-positive blob, 8 voxels
    labels[8:14, 7:9, 7:9] = 2  # the cord, upper piece (24 voxels)
    labels[16:22, 7:9, 7:9] = 2  # lower piece (24 voxels), a gap of two slices
    return labels


def test_recommended_for_the_ct_model_keeps_the_largest_parotid_piece_and_the_whole_cord() -> None:
    from napari_medmamba.inference import recommended_postprocess
    from napari_medmamba.models import get_model_spec
    from napari_medmamba.models.zoo import HN_OAR_LABELS

    labels = _hn_organs_in_pieces()
    for name in ("lightm_unet_3d_hn_oar", "unet_3d_hn_oar"):
        config = recommended_postprocess(name)
        assert config is not None and config == recommended_postprocess(get_model_spec(name))
        kept = {HN_OAR_LABELS[c] for c in config.largest_component}
        assert {"right parotid", "left parotid", "brainstem"} <= kept and "spinal cord" not in kept
        out = apply_postprocess(labels, config, voxel_volume_ml=0.04)
        assert np.count_nonzero(out == 3) == 64 and out[2, 12, 12] == 0  # the stray parotid blob is gone
        assert np.count_nonzero(out == 2) == 48  # both pieces of the cord stay
    # "largest component of every class" would cut the cord: why it is not the recommendation
    assert np.count_nonzero(apply_postprocess(labels, Postprocess(largest_component=True), 0.04) == 2) == 24


def test_no_recommended_clean_up_for_the_hippocampus_models_and_the_three_choices() -> None:
    from napari_medmamba.cli import POSTPROCESS_CHOICES as CLI_CHOICES
    from napari_medmamba.inference import (
        POSTPROCESS_CHOICES,
        describe_postprocess,
        postprocess_for,
        recommended_postprocess,
    )
    from napari_medmamba.models import get_model_spec

    assert CLI_CHOICES == POSTPROCESS_CHOICES == ("recommended", "none", "largest")
    for name in ("lightm_unet_3d", "mhs_vm_2d"):
        assert recommended_postprocess(name) is None and postprocess_for("recommended", name) is None
    spec = get_model_spec("lightm_unet_3d_hn_oar")
    net_contract_name = (None, spec.contract, spec.name)  # the CLI's resolved model tuple
    assert postprocess_for("recommended", net_contract_name) == Postprocess(largest_component=(1, 3, 4, 6, 7))
    assert postprocess_for("none", spec) is None
    assert postprocess_for("largest", spec) == Postprocess(largest_component=True)
    assert describe_postprocess(postprocess_for("recommended", spec), spec.contract.label_names) == (
        "largest component of brainstem, right parotid, left parotid, larynx, mandible")
    assert describe_postprocess(None) == "none"
    with pytest.raises(ValueError, match="recommended, none, largest"):
        postprocess_for("biggest", spec)
