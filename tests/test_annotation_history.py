"""LabelHistory: sparse undo/redo for any operation, bounded, with the edit log in step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_medmamba.annotation.history import LabelHistory
from napari_medmamba.annotation.tools import interpolate_label, slab

SHAPE = (8, 10, 12)


def _history(**kwargs) -> LabelHistory:
    return LabelHistory(np.zeros(SHAPE, np.uint8), **kwargs)


def test_apply_at_indices_undo_redo() -> None:
    h = _history()
    entry = h.apply("paint", 3, indices=(np.array([1, 1]), np.array([2, 3]), np.array([4, 5])), axis=0)
    assert entry is not None and entry.edit.voxels_changed == 2
    assert h.labels[1, 2, 4] == 3 and h.labels[1, 3, 5] == 3
    assert h.edit_log.edited_mask.sum() == 2
    h.undo()
    assert not h.labels.any() and not h.edit_log.edited_mask.any() and h.edit_log.edits == []
    h.redo()
    assert h.labels.sum() == 6 and h.edit_log.edited_mask.sum() == 2 and len(h.edit_log.edits) == 1
    assert h.undo() is not None and h.undo() is None


def test_entries_store_only_changed_voxels() -> None:
    labels = np.zeros((64, 64, 64), np.uint16)
    labels[10:20] = 1
    h = LabelHistory(labels)
    new = labels.copy()
    new[15, 30, 30] = 2
    entry = h.apply("model_run", new)  # whole-volume replacement, one voxel differs
    assert entry.indices.size == 1
    assert h.nbytes < 1000
    assert h.apply("paint", new) is None  # no change, no entry
    assert len(h) == 1


def test_region_callable_and_mask() -> None:
    h = _history()
    region = (slice(2, 4), slice(0, 5), slice(0, 5))
    h.apply("fill", lambda block: np.full_like(block, 7), region=region)
    assert (h.labels[region] == 7).all() and h.labels.sum() == 7 * 2 * 5 * 5
    mask = np.zeros((2, 5, 5), bool)
    mask[0, 0, 0] = True
    h.apply("erase", 0, region=region, mask=mask)
    assert h.labels[2, 0, 0] == 0 and h.labels[3, 0, 0] == 7
    h.undo()
    h.undo()
    assert not h.labels.any()


def test_interpolation_result_goes_through_history() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 3:6, 3:6] = 2
    labels[5, 3:6, 3:6] = 2
    h = LabelHistory(labels)
    block = interpolate_label(h.labels, 2, 0, 1, 5)
    h.apply("interpolate", block, region=slab(SHAPE, 0, 2, 5))
    assert (h.labels[2:5, 3:6, 3:6] == 2).all()
    assert h.edit_log.edits[-1].slices == (2, 3, 4)
    h.undo()
    assert not h.labels[2:5].any()


def test_record_applied_for_in_place_painting() -> None:
    h = _history()
    idx = (np.array([0, 0]), np.array([0, 1]), np.array([0, 0]))
    h.labels[idx] = 5  # napari painted in place
    h.record_applied("paint", idx, old_values=np.zeros(2, np.uint8))
    assert h.labels[idx].tolist() == [5, 5] and h.edit_log.edited_mask[idx].all()
    h.undo()
    assert not h.labels.any()


def test_repeated_indices_last_write_wins() -> None:
    h = _history()
    h.apply("paint", np.array([1, 2, 3]), indices=np.array([7, 7, 7]))
    assert h.labels.reshape(-1)[7] == 3
    h.undo()
    assert h.labels.reshape(-1)[7] == 0


def test_accept_slice_is_undoable() -> None:
    h = _history()
    h.accept_slice(0, 3)
    assert h.edit_log.reviewed_indices(0) == {3}
    h.undo()
    assert h.edit_log.reviewed_indices(0) == set()
    h.redo()
    assert h.edit_log.reviewed_indices(0) == {3}


def test_new_apply_clears_redo() -> None:
    h = _history()
    h.apply("paint", 1, indices=np.array([0]))
    h.undo()
    h.apply("paint", 2, indices=np.array([1]))
    assert not h.can_redo and h.redo() is None


def test_bounded_by_entries_and_bytes() -> None:
    h = _history(max_entries=3)
    for i in range(5):
        h.apply("paint", 1, indices=np.array([i]))
    assert len(h) == 3
    for _ in range(3):
        h.undo()
    assert h.undo() is None
    assert h.labels.reshape(-1)[:5].tolist() == [1, 1, 0, 0, 0]  # the dropped two stay applied
    assert [e.voxels_changed for e in h.edit_log.edits] == [1, 1]

    big = _history(max_bytes=4000)
    for i in range(10):
        big.apply("fill", 1 + i % 2, region=(slice(0, 2), slice(None), slice(None)))  # 240 voxels each
    assert big.nbytes <= 4000 and 1 <= len(big) < 10


def test_refuses_values_that_do_not_fit() -> None:
    h = _history()
    with pytest.raises(ValueError, match="do not fit"):
        h.apply("paint", 300, indices=np.array([0]))
    with pytest.raises(ValueError, match="whole numbers"):
        h.apply("paint", 0.5, indices=np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        h.apply("paint", 1, indices=np.array([10**6]))
    with pytest.raises(ValueError, match="contiguous"):
        LabelHistory(np.zeros((4, 4, 4), np.uint8)[:, ::2])
    assert not h.labels.any() and len(h) == 0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("op"), st.lists(st.integers(0, 59), min_size=1, max_size=8), st.integers(0, 3)),
            st.tuples(st.just("undo")),
            st.tuples(st.just("redo")),
        ),
        max_size=25,
    )
)
def test_random_sequences_match_a_full_copy_model(ops) -> None:
    """Undo/redo always reproduce the states a naive full-copy history would."""
    h = LabelHistory(np.zeros((3, 4, 5), np.uint8), max_entries=1000)
    states = [h.labels.copy()]
    masks = [h.edit_log.edited_mask.copy()]
    pos = 0
    for op in ops:
        if op[0] == "op":
            if h.apply("paint", op[2], indices=np.array(op[1])) is not None:
                states, masks = states[: pos + 1], masks[: pos + 1]
                states.append(h.labels.copy())
                masks.append(h.edit_log.edited_mask.copy())
                pos += 1
        elif op[0] == "undo":
            if h.undo() is not None:
                pos -= 1
        elif h.redo() is not None:
            pos += 1
        np.testing.assert_array_equal(h.labels, states[pos])
        np.testing.assert_array_equal(h.edit_log.edited_mask, masks[pos])
        assert len(h.edit_log.edits) == pos
