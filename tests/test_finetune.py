"""Fine-tuning on corrected slices (CPU, a few steps on the shipped LightM-UNet 3D and the hippocampus crop)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_medmamba.annotation.edit_log import EditLog
from napari_medmamba.inference.engine import segment
from napari_medmamba.models import REGISTRY, load_registered_model
from napari_medmamba.samples import load_sample
from napari_medmamba.training.finetune import (
    CorrectionExample,
    finetune,
    prepare_example,
    register_finetuned,
    supervision_mask,
    unregister,
)
from napari_medmamba.training.losses import dice_ce_loss

BASE = "lightm_unet_3d"
PATCH = (8, 32, 32)


@pytest.fixture(scope="module")
def example() -> CorrectionExample:
    torch.set_num_threads(2)
    volume = load_sample("mni152_t1_right_hippocampus")
    base = segment(volume, BASE, device="cpu", return_probabilities=False).labels.array
    corrected = base.copy()
    grown = np.zeros_like(base, dtype=bool)  # label 1 grown by one voxel in-plane: a systematic correction
    grown[:, 1:, :] |= base[:, :-1, :] == 1
    grown[:, :-1, :] |= base[:, 1:, :] == 1
    corrected[grown & (base == 0)] = 1
    log = EditLog(volume.shape)
    for z in np.flatnonzero((base > 0).any(axis=(1, 2)))[::3]:
        log.accept_slice(0, int(z))
    return CorrectionExample(volume, corrected, log)


@pytest.fixture(scope="module")
def result(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    return finetune(BASE, [example], max_steps=2, budget_s=120, mode="decoder", device="cpu", patch_size=PATCH,
                    eval_every=1, out_dir=out)


def test_unreviewed_voxels_do_not_contribute(example) -> None:
    mask = supervision_mask(example)
    assert mask.any() and not mask.all()
    wrong = example.labels.copy()
    wrong[~mask] = 0  # everything unreviewed is (wrong) background
    prep = prepare_example(example, REGISTRY[BASE].contract)
    prep_wrong = prepare_example(CorrectionExample(example.volume, wrong, example.edit_log), REGISTRY[BASE].contract)
    assert np.array_equal(prep.supervised, prep_wrong.supervised)
    logits = torch.randn(1, 3, *prep.labels.shape, generator=torch.Generator().manual_seed(0))
    ignore = torch.from_numpy(~prep.supervised)[None]
    a = dice_ce_loss(logits, torch.from_numpy(prep.labels)[None], ignore_mask=ignore)
    b = dice_ce_loss(logits, torch.from_numpy(prep_wrong.labels)[None], ignore_mask=ignore)
    assert torch.allclose(a, b)


def test_decoder_mode_freezes_encoder_and_reports_dice(result) -> None:
    base = load_registered_model(BASE)
    before, after = base.state_dict(), result.model.state_dict()
    encoder = [k for k in before if k.startswith(("convInit.", "down_layers.")) and ".norm" not in k
               and "conv_final" not in k and not k.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"))]
    assert encoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert result.steps == 2 and result.heldout_slices >= 1 and result.train_slices >= 1
    assert set(result.dice_before) == {"anterior hippocampus", "posterior hippocampus", "mean"}
    assert result.dice_after["mean"] >= result.dice_before["mean"]  # the best state is kept


def test_card_has_base_sha_fingerprint_and_no_paths(result, tmp_path_factory) -> None:
    card = json.loads(result.card_path.read_text())
    assert card["base_model"] == BASE and card["base_weights_sha256"] == REGISTRY[BASE].sha256
    assert len(card["data_fingerprint"]) == 64 and card["data_fingerprint"] == result.data_fingerprint
    assert card["intended_use"].startswith("Research only")
    assert card["steps"] == 2 and card["mode"] == "decoder" and "dice_after" in card
    text = json.dumps(card)
    assert str(result.card_path.parent) not in text and "mni152" not in text
    assert result.weights_path.is_file()


def test_register_finetuned_runs_in_segment(result, example) -> None:
    spec = register_finetuned(result)
    try:
        assert spec.name.startswith(f"{BASE}-ft-")
        out = segment(example.volume, spec.name, device="cpu", return_probabilities=False)
        assert out.labels.array.shape == example.volume.shape and out.model_name == spec.name
        assert not any("random weights" in w for w in out.warnings)  # the fine-tuned network, not a fresh one
    finally:
        unregister(spec.name)
    assert spec.name not in REGISTRY
    with pytest.raises(ValueError):
        unregister(BASE)


def test_cancel_stops_early(example) -> None:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    r = finetune(BASE, [example], max_steps=50, budget_s=120, device="cpu", patch_size=PATCH, cancel=cancel)
    assert r.stop_reason == "cancelled" and r.steps == 1
