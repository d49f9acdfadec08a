"""EditLog: edited voxels, reviewed slices, summary and serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medmamba.annotation.edit_log import EditLog, EditLogError

SHAPE = (6, 5, 4)


def _flat(*coords: tuple[int, int, int]) -> np.ndarray:
    return np.ravel_multi_index(tuple(np.array(c) for c in zip(*coords, strict=True)), SHAPE)


def test_record_marks_edited_voxels_and_touched_slices() -> None:
    log = EditLog(SHAPE)
    voxels = _flat((1, 0, 0), (3, 2, 1), (3, 4, 3))
    change = log.record("paint", voxels, labels=[2], replaced=[0], axis=0, timestamp=5.0)
    assert change.edit.slices == (1, 3)
    assert change.edit.voxels_changed == 3
    assert change.edit.labels == (2,) and change.edit.replaced == (0,)
    expected = np.zeros(SHAPE, bool)
    expected[1, 0, 0] = expected[3, 2, 1] = expected[3, 4, 3] = True
    np.testing.assert_array_equal(log.edited_mask, expected)
    with pytest.raises(ValueError):
        log.edited_mask[0, 0, 0] = True  # read-only view


def test_reviewed_mask_is_reviewed_slices_or_edited_voxels() -> None:
    log = EditLog(SHAPE)
    log.accept_slice(axis=0, index=2)
    log.accept_slice(axis=2, index=1)
    log.record("erase", _flat((5, 4, 3)), labels=[0], replaced=[1])
    mask = log.reviewed_mask(SHAPE)
    expected = np.zeros(SHAPE, bool)
    expected[2] = True
    expected[:, :, 1] = True
    expected[5, 4, 3] = True
    np.testing.assert_array_equal(mask, expected)
    assert log.reviewed_indices(0) == {2} and log.reviewed_indices(2) == {1}
    with pytest.raises(ValueError):
        log.reviewed_mask((1, 2, 3))


def test_model_run_clears_user_confirmation_and_revert_restores_it() -> None:
    log = EditLog(SHAPE)
    log.record("paint", _flat((0, 0, 0), (1, 1, 1)), labels=[1])
    log.accept_slice(0, 4)
    before_mask, before_slices = log.edited_mask.copy(), log.reviewed_slices
    change = log.record("model_run", _flat((0, 0, 0), (4, 0, 0)), labels=[3])
    assert not log.edited_mask[0, 0, 0] and log.edited_mask[1, 1, 1]
    assert (0, 4) not in log.reviewed_slices
    log.revert(change)
    np.testing.assert_array_equal(log.edited_mask, before_mask)
    assert log.reviewed_slices == before_slices
    log.reapply(change)
    assert not log.edited_mask[0, 0, 0] and (0, 4) not in log.reviewed_slices


def test_revert_keeps_voxels_edited_by_earlier_edits() -> None:
    log = EditLog(SHAPE)
    log.record("paint", _flat((2, 2, 2)), labels=[1])
    second = log.record("fill", _flat((2, 2, 2), (2, 2, 3)), labels=[2])
    log.revert(second)
    assert log.edited_mask[2, 2, 2] and not log.edited_mask[2, 2, 3]
    assert len(log.edits) == 1
    with pytest.raises(ValueError, match="last first"):
        log.revert(second)


def test_summary_counts() -> None:
    log = EditLog(SHAPE)
    log.record("paint", _flat((0, 0, 0), (0, 0, 1)), labels=[1], timestamp=10.0)
    log.accept_slice(0, 5, timestamp=20.0)
    s = log.summary()
    assert s["edits"] == 2
    assert s["edits_by_kind"]["paint"] == 1 and s["edits_by_kind"]["accept_slice"] == 1
    assert s["voxels_edited"] == 2
    assert s["voxels_reviewed"] == 2 + 5 * 4
    assert s["reviewed_slices"]["axis0"] == [5]
    assert s["labels_edited"] == [1]
    assert (s["first_edit"], s["last_edit"]) == (10.0, 20.0)


def test_roundtrip_bytes_and_file(tmp_path) -> None:
    rng = np.random.default_rng(0)
    log = EditLog((9, 7, 5))
    log.record("scribble", rng.choice(9 * 7 * 5, 40, replace=False), labels=[4], axis=1, timestamp=1.5)
    log.accept_slice(2, 3)
    path = log.save(tmp_path / "log.npz")
    for loaded in (EditLog.from_bytes(log.to_bytes()), EditLog.load(path)):
        np.testing.assert_array_equal(loaded.edited_mask, log.edited_mask)
        assert loaded.reviewed_slices == log.reviewed_slices
        assert loaded.edits == log.edits
    # compact: bits, not bytes, per voxel, and no image data
    assert len(log.to_bytes()) < 2000


def test_load_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EditLogError, match="broken.npz"):
        EditLog.load(bad)
    with pytest.raises(EditLogError, match="missing.npz"):
        EditLog.load(tmp_path / "missing.npz")


def test_invalid_input_is_refused() -> None:
    log = EditLog(SHAPE)
    with pytest.raises(ValueError, match="unknown edit kind"):
        log.record("smudge", _flat((0, 0, 0)))
    with pytest.raises(ValueError, match="outside"):
        log.record("paint", np.array([np.prod(SHAPE)]))
    with pytest.raises(ValueError, match="axis"):
        log.accept_slice(3, 0)
    with pytest.raises(ValueError, match="slice index"):
        log.accept_slice(0, 6)
