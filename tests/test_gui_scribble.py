"""Scribble refinement in the Review widget: scribbles + model probabilities re-segment one slice, undoably."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _autosave_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDMAMBA_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def test_scribbles_refine_the_current_slice_and_undo(make_napari_viewer) -> None:
    from napari_medmamba._napari._widgets._common import session_for
    from napari_medmamba._napari._widgets.review import ReviewWidget

    viewer = make_napari_viewer()
    # the model saw a disc of radius 8 at (16, 16) on every slice, but labelled only a small square
    zz, yy, xx = np.mgrid[:5, :32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 <= 64
    prob = np.where(disc, 0.9, 0.05).astype(np.float32)
    labels = np.zeros((5, 32, 32), np.uint8)
    labels[:, 14:18, 14:18] = 1
    layer = viewer.add_labels(labels.copy(), name="organ")
    review = ReviewWidget(viewer)
    session = session_for(layer)
    session.probabilities = np.stack([1 - prob, prob])
    review.label_spin.setValue(1)

    scribbles = review.add_scribble_layer()
    assert scribbles.data.shape == labels.shape
    assert review.layer is layer and review.layer_combo.findText(scribbles.name) == -1  # not a label map to review
    viewer.dims.set_point(0, 2)
    assert review.current_slice() == 2
    scribbles.data[2, 10:22, 16] = 1          # a stroke inside the disc
    scribbles.data[2, 1:3, 1:30] = 2          # a stroke outside it
    assert review.refine_from_scribbles()

    refined = np.asarray(layer.data)
    dice = 2 * (refined[2].astype(bool) & disc[2]).sum() / (refined[2].astype(bool).sum() + disc[2].sum())
    assert dice > 0.9                                     # the slice now follows the disc
    np.testing.assert_array_equal(refined[[0, 1, 3, 4]], labels[[0, 1, 3, 4]])  # other slices untouched
    assert not np.asarray(scribbles.data)[2].any()        # scribbles consumed
    assert session.history.edit_log.edits[-1].kind == "scribble"
    review.undo()
    np.testing.assert_array_equal(np.asarray(layer.data), labels)
    review.redo()
    np.testing.assert_array_equal(np.asarray(layer.data), refined)
    review.shutdown()


def test_refine_without_probabilities_notifies(make_napari_viewer) -> None:
    from napari_medmamba._napari._widgets.review import ReviewWidget

    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((3, 16, 16), np.uint8), name="organ")
    review = ReviewWidget(viewer)
    assert review.refine_from_scribbles() is False
    review.shutdown()
