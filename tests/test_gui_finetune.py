"""GUI: the Fine-tune dock widget, end to end in napari (segment -> review/correct -> fine-tune -> re-segment).

Run under a display: ``xvfb-run -a python -m pytest tests/test_gui_finetune.py``.

A tiny voxel-wise model (registered for the test only; one 1x1x1 convolution) on a synthetic 12 x 32 x 32
scan keeps every run to a fraction of a second; the fine-tuned models go to a temporary store
(``MEDMAMBA_MODELS_DIR``).
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
torch = pytest.importorskip("torch")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_medmamba.models import registry  # noqa: E402
from napari_medmamba.models.registry import InputContract, ModelSpec  # noqa: E402
from napari_medmamba.training.model_store import list_finetuned  # noqa: E402

pytestmark = pytest.mark.gui

TINY = "tiny_voxel_test"
CONTRACT = InputContract(
    spatial_dims=3, in_channels=1, label_names=("background", "organ"), label_colors=("#000000", "#ff7f0e"),
    patch_size=(8, 32, 32), target_spacing=None, orientation=None, modality="MR", normalization="zscore",
)


class VoxelNet(torch.nn.Module):
    """Logits from intensity alone: 'organ' where the (normalised) intensity exceeds a threshold."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 4.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -8.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.conv(x)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(registry.REGISTRY, TINY, ModelSpec(TINY, lambda: VoxelNet(), CONTRACT, "test model"))
    monkeypatch.setenv("MEDMAMBA_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    store = tmp_path / "models"
    monkeypatch.setenv("MEDMAMBA_MODELS_DIR", str(store))
    yield store
    for name in [n for n, s in registry.REGISTRY.items() if s.card.get("finetuned")]:
        del registry.REGISTRY[name]  # fine-tuned test models must not leak into other tests


def _messages(start: int = 0) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:]]


def _scan() -> np.ndarray:
    """A bright ball (the organ) and a dimmer blob beside it that the base model also calls organ."""
    zz, yy, xx = np.mgrid[:12, :32, :32]
    image = np.full((12, 32, 32), 100.0, np.float32)
    image[(zz - 6) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 25] = 400.0
    image[(zz - 6) ** 2 / 30 + ((yy - 22) ** 2 + (xx - 22) ** 2) / 9 <= 1] = 260.0  # spans z = 1..11
    return image + np.random.default_rng(0).normal(0, 5, image.shape).astype(np.float32)


@pytest.fixture
def setup(make_napari_viewer, qtbot):
    from napari_medmamba._napari._widgets.finetune import FinetuneWidget
    from napari_medmamba._napari._widgets.review import ReviewWidget
    from napari_medmamba._napari._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(_scan(), name="scan")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    seg.model_combo.setCurrentText(TINY)
    seg.device_combo.setCurrentText("CPU")
    seg.run()
    qtbot.waitUntil(lambda: not seg.running, timeout=30_000)
    assert seg.last_outcome == "done", _messages()
    labels = seg.last_layer
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review & correct")
    assert review.layer is labels
    ft = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(ft, name="Fine-tune")
    assert ft.labels_combo.currentText() == labels.name and ft.image_combo.currentText() == "scan"
    assert ft.model_combo.currentText() == TINY  # the model that produced the labels
    ft.mode_combo.setCurrentIndex(1)  # full network: the tiny net has no encoder / decoder split
    yield viewer, seg, review, ft, labels
    review.shutdown()


def _correct_and_review(viewer, review, labels) -> np.ndarray:
    """Erase the dim blob (not the organ) on slices 4..8, paint a spot the image does not show (no voxel model
    can learn it) and mark the slices reviewed; returns the corrected map."""
    history = review.session.history
    history.apply("paint", 1, indices=(np.full(9, 6), np.repeat([2, 3, 4], 3), np.tile([28, 29, 30], 3)))
    for z in range(4, 9):
        blob = np.zeros(labels.data.shape, bool)
        blob[z, 16:29, 16:29] = True
        history.apply("erase", 0, indices=np.nonzero(blob & (labels.data > 0)))
        viewer.dims.set_point(0, z)
        assert review.mark_reviewed() == z
    labels.refresh()
    return labels.data.copy()


def test_no_review_gives_a_clear_message(setup, _env: Path) -> None:
    viewer, seg, review, ft, labels = setup
    assert "Nothing to learn from" in ft.supervision.text()
    start = len(notification_manager.records)
    assert ft.run() is False and not ft.running
    assert "review or correct some slices first" in ft.last_message
    assert any("review or correct some slices first" in m for m in _messages(start))
    assert list_finetuned(_env) == []


@pytest.mark.usefixtures("network_blocked")  # the GUI flow makes no network attempt (#14)
def test_finetune_saves_selects_reruns_reverts_and_clears(setup, qtbot, _env: Path) -> None:
    viewer, seg, review, ft, labels = setup
    corrected = _correct_and_review(viewer, review, labels)
    confirmed = review.session.history.edit_log.reviewed_mask()
    ft._seen = None
    ft._update_supervision()
    assert "<b>5</b> axial slice(s): 5 reviewed, 5 with corrections" in ft.supervision.text()

    ft.max_steps = 5
    ft.finetune_options = {"eval_every": 1, "lr": 0.3, "patience": 100}
    assert ft.run() and ft.running
    qtbot.waitUntil(lambda: not ft.running, timeout=60_000)
    assert ft.last_outcome == "done", (ft.last_message, _messages())

    # saved in the store, owner-only
    stored = list_finetuned(_env)
    assert len(stored) == 1 and stored[0].name == ft.new_name and ft.new_name.startswith(f"{TINY}-ft-")
    assert stat.S_IMODE(_env.stat().st_mode) == 0o700
    for path in (stored[0].weights, stored[0].card_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stored[0].card["base_model"] == TINY and stored[0].card["steps"] == 5

    # registered, listed and selected in Segment (and here); Dice before -> after shown
    names = [seg.model_combo.itemText(i) for i in range(seg.model_combo.count())]
    assert ft.new_name in names and seg.model_combo.currentText() == ft.new_name
    assert "fine-tuned from" in seg.model_card.text()
    assert ft.model_combo.currentText() == ft.new_name
    text = ft.result_label.text()
    assert "held-back slice" in text and "→" in text and ft.new_name in text
    r = ft.last_result
    assert f"{r.dice_before['mean']:.3f} → {r.dice_after['mean']:.3f}" in text
    assert r.steps == 5 and r.heldout_slices >= 1 and r.dice_after["mean"] > r.dice_before["mean"]

    # re-run: every confirmed voxel keeps the user's label; the rest is the new model's output
    from napari_medmamba._napari._widgets._common import layer_volume
    from napari_medmamba.inference import segment

    rerun = segment(layer_volume(viewer.layers["scan"]), ft.new_name, device="cpu").labels.array
    data = np.asarray(labels.data)
    np.testing.assert_array_equal(data[confirmed], corrected[confirmed])
    np.testing.assert_array_equal(data[~confirmed], rerun[~confirmed])
    assert (rerun[confirmed] != corrected[confirmed]).any()  # the model disagrees there: the user's labels won
    assert (data[~confirmed] != corrected[~confirmed]).any()  # and it learned: the blob left unreviewed slices too
    history = review.session.history
    assert history.edit_log.edits[-1].kind == "model_run" and history.edit_log.reviewed_indices(0) == set(range(4, 9))
    review.undo()  # the re-run is one undoable step
    np.testing.assert_array_equal(np.asarray(labels.data), corrected)
    review.redo()

    # one click back to the base model
    assert ft.revert_button.isEnabled()
    ft.revert_button.click()
    assert seg.model_combo.currentText() == TINY and ft.model_combo.currentText() == TINY

    # the store folder is shown; Clear asks first
    assert str(_env) in ft.store_label.text() and "1 model(s)" in ft.store_label.text()
    asked: list[str] = []
    ft._confirm = lambda text: asked.append(text) or False
    assert ft.clear_store() == 0 and len(list_finetuned(_env)) == 1 and asked
    ft._confirm = lambda text: True
    ft.clear_button.click()
    assert list_finetuned(_env) == [] and "0 model(s)" in ft.store_label.text()
    names = [seg.model_combo.itemText(i) for i in range(seg.model_combo.count())]
    assert ft.new_name is None and not any("-ft-" in n for n in names)
    assert seg.model_combo.currentText() == TINY


def test_cancel_saves_nothing_and_keeps_the_base(setup, qtbot, monkeypatch, _env: Path) -> None:
    viewer, seg, review, ft, labels = setup
    corrected = _correct_and_review(viewer, review, labels)
    monkeypatch.setitem(registry.REGISTRY, TINY, ModelSpec(TINY, lambda: VoxelNet(0.05), CONTRACT, "slow"))
    ft.max_steps = 10_000
    ft.budget_spin.setValue(600)
    assert ft.run()
    qtbot.wait(300)
    ft.cancel_button.click()
    qtbot.waitUntil(lambda: not ft.running, timeout=30_000)
    assert ft.last_outcome == "cancelled"
    assert "nothing was saved" in ft.status.text()
    assert list_finetuned(_env) == [] and not any(s.card.get("finetuned") for s in registry.REGISTRY.values())
    assert seg.model_combo.currentText() == TINY and not ft.revert_button.isEnabled()
    np.testing.assert_array_equal(np.asarray(labels.data), corrected)


def test_result_names_the_anchored_classes() -> None:
    """The result text tells the user which structures were kept close to the base model, and only then."""
    from types import SimpleNamespace

    from napari_medmamba._napari._widgets.finetune import FinetuneWidget

    base = dict(dice_before={"mean": 0.5, "left parotid": 0.5}, dice_after={"mean": 0.6, "left parotid": 0.6},
                heldout_slices=2, best_step=5, steps=10, train_slices=4, seconds=3.0, stop_reason="budget")
    text = FinetuneWidget._result_html(SimpleNamespace(**base, card={"anchored_classes": ["larynx", "esophagus"]}),
                                       "ct-ft", 100)
    assert "Kept close to the base model" in text and "larynx, esophagus" in text
    plain = FinetuneWidget._result_html(SimpleNamespace(**base, card={"anchored_classes": []}), "ct-ft", 100)
    assert "Kept close" not in plain
