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
    import stat  # owner-only files in an owner-only store

    assert stat.S_IMODE(result.weights_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.card_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.card_path.parent.stat().st_mode) == 0o700
    from safetensors import safe_open  # weights only: every tensor is a parameter or buffer of the network

    with safe_open(str(result.weights_path), "pt") as f:
        assert set(f.keys()) == set(result.model.state_dict())


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


# ---- few-shot new structure: new_labels widens the classification layer -------------------------------

def test_find_and_widen_head_keeps_existing_logits() -> None:
    from napari_medmamba.models.unet import UNet
    from napari_medmamba.training.finetune import NEW_CLASS_BIAS_OFFSET, find_head, widen_head

    net = load_registered_model(BASE).eval()
    assert find_head(net, 3)[0] == "conv_final.2.1.conv"
    assert find_head(UNet(3, 1, 3, features=(4, 8)), 3)[0] == "head"
    x = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
        assert widen_head(net, 3, 2) == "conv_final.2.1.conv"
        after = net(x)
    assert after.shape[1] == 5 and net.arch_config["out_channels"] == 5
    assert torch.allclose(after[:, :3], before, atol=1e-5)
    for c in (3, 4):  # background's logit, lowered: the widened net still predicts what the base predicted
        assert torch.allclose(after[:, c], before[:, 0] - NEW_CLASS_BIAS_OFFSET, atol=1e-4)
    assert torch.equal(after.argmax(1), before.argmax(1))
    with pytest.raises(ValueError):
        find_head(net, 7)


@pytest.fixture(scope="module")
def new_structure(example):
    labels = np.asarray(example.labels).copy()
    zs = sorted(example.edit_log.reviewed_indices(0))
    labels[zs[0]:zs[-1] + 1, 2:6, 2:8] = 3  # a "new structure" the base never saw, on the reviewed slices
    return CorrectionExample(example.volume, labels, example.edit_log)


def test_new_labels_extend_contract_card_and_head(new_structure, tmp_path) -> None:
    from napari_medmamba.models.checkpoints import load_checkpoint

    r = finetune(BASE, [new_structure], max_steps=2, budget_s=120, device="cpu", patch_size=PATCH, eval_every=1,
                 out_dir=tmp_path, new_labels=["fornix"])
    base = REGISTRY[BASE].contract
    c = r.spec.contract
    assert c.label_names == base.label_names + ("fornix",) and c.num_classes == 4
    assert len(c.label_colors) == 4 and c.label_colors[:3] == base.label_colors
    assert c.label_colors[3] not in base.label_colors
    assert r.card["new_labels"] == ["fornix"] and r.card["labels"][-1] == "fornix"
    assert r.card["base_labels"] == list(base.label_names) and r.card["head"]["layer"] == "conv_final.2.1.conv"
    assert set(r.dice_before) == {"anterior hippocampus", "posterior hippocampus", "fornix", "mean"}
    assert REGISTRY[BASE].contract.num_classes == 3  # the registered base is untouched
    reloaded = load_checkpoint(r.weights_path)
    with torch.no_grad():
        assert reloaded(torch.zeros(1, 1, 8, 16, 16)).shape[1] == 4
    out = segment(new_structure.volume, (r.model, c, r.spec.name), device="cpu", return_probabilities=False)
    assert out.labels.array.shape == new_structure.volume.shape and out.labels.array.max() <= 3
    # from the model store (a new session): the widened head and the extended contract come back
    from napari_medmamba.training.model_store import load_finetuned

    spec = load_finetuned(r.spec.name, store=tmp_path, register_it=False)
    assert spec.contract.label_names == c.label_names and spec.contract.label_colors == c.label_colors
    with torch.no_grad():
        assert spec.factory()(torch.zeros(1, 1, 8, 16, 16)).shape[1] == 4


def test_new_labels_are_validated(example, new_structure) -> None:
    with pytest.raises(ValueError, match="must lie in"):  # class 3 without a new label: rejected as before
        finetune(BASE, [new_structure], max_steps=1, device="cpu", patch_size=PATCH)
    with pytest.raises(ValueError, match="distinct"):
        finetune(BASE, [example], max_steps=1, device="cpu", patch_size=PATCH, new_labels=["anterior hippocampus"])
    with pytest.raises(ValueError, match="one colour"):
        finetune(BASE, [example], max_steps=1, device="cpu", patch_size=PATCH, new_labels=["a", "b"],
                 new_label_colors=["#123456"])
    with pytest.raises(TypeError):
        finetune(BASE, [example], max_steps=1, device="cpu", patch_size=PATCH, new_labels="fornix")


def test_anchor_loss_keeps_only_the_anchored_classes() -> None:
    """Zero for the base's own logits; blind to how the free classes share their mass; masked voxels ignored."""
    from napari_medmamba.training.finetune import anchor_loss

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 3, 5, 5, generator=g)
    where = torch.ones(2, 3, 5, 5, dtype=torch.bool)
    assert anchor_loss(base, base, [2], where).item() == pytest.approx(0.0, abs=1e-6)
    swapped = base[:, [0, 3, 2, 1]]  # classes 1 and 3 (free) exchanged, class 2 (anchored) untouched
    assert anchor_loss(swapped, base, [2], where).item() == pytest.approx(0.0, abs=1e-6)
    moved = base.clone()
    moved[:, 2] -= 3.0
    assert anchor_loss(moved, base, [2], where).item() > 0.05
    assert anchor_loss(moved, base, [2], torch.zeros_like(where)).item() == 0.0
    wider = torch.cat([base, torch.full_like(base[:, :1], -30.0)], dim=1)  # a widened head: one more class
    assert anchor_loss(wider, base, [2], where).item() == pytest.approx(0.0, abs=1e-5)


def test_unshown_classes() -> None:
    from napari_medmamba.training.finetune import PreparedExample, unshown_classes

    labels = np.zeros((4, 3, 3), np.int64)
    labels[0, 0, 0], labels[2, 1, 1], labels[3, 2, 2] = 1, 3, 2
    mask = np.zeros(labels.shape, bool)
    mask[:3] = True  # class 2 only on an unsupervised slice
    prep = PreparedExample(np.zeros(labels.shape, np.float32), labels, mask)
    assert unshown_classes([prep], [mask], 5) == [2, 4]


def test_anchor_keeps_a_class_the_corrections_never_show() -> None:
    """Corrections on slices without the posterior hippocampus: with the anchor its prediction elsewhere stays
    closer to the base model's than without (measured 0.90 vs 0.85 Dice to the base at 20 steps)."""
    torch.set_num_threads(2)
    volume = load_sample("mni152_t1_right_hippocampus")
    base = segment(volume, BASE, device="cpu", return_probabilities=False).labels.array
    only_anterior = [z for z in range(base.shape[0]) if (base[z] == 1).any() and not (base[z] == 2).any()]
    assert len(only_anterior) >= 4
    corrected = base.copy()
    grown = np.zeros_like(base, dtype=bool)
    grown[:, 1:, :] |= base[:, :-1, :] == 1
    grown[:, :-1, :] |= base[:, 1:, :] == 1
    corrected[grown & (base == 0)] = 1
    log = EditLog(volume.shape)
    for z in only_anterior:
        log.accept_slice(0, int(z))
    example = CorrectionExample(volume, corrected, log)
    agreement = {}
    for weight in (0.0, 1.0):
        res = finetune(BASE, [example], max_steps=20, budget_s=600, mode="decoder", device="cpu", patch_size=PATCH,
                       eval_every=100, holdout_fraction=0.0, anchor_weight=weight)
        assert res.card["anchored_classes"] == ([] if weight == 0 else ["posterior hippocampus"])
        after = segment(volume, (res.model, res.spec.contract, "ft"), device="cpu", return_probabilities=False)
        a, b = after.labels.array == 2, base == 2
        agreement[weight] = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert agreement[1.0] > agreement[0.0] + 0.01, agreement


def test_finetune_flips_with_the_contracts_left_right_pairs(example, monkeypatch) -> None:
    """Fine-tuning's left-right flip swaps the contract's right/left labels, as training's does."""
    import dataclasses

    import napari_medmamba.training.finetune as ft

    spec = REGISTRY[BASE]
    paired = dataclasses.replace(spec, contract=dataclasses.replace(spec.contract, lr_label_pairs=((1, 2),)))
    seen = []
    real = ft.augment_batch

    def recording(*args, **kwargs):
        seen.append(tuple(kwargs.get("lr_label_pairs", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "augment_batch", recording)
    finetune(paired, [example], max_steps=1, budget_s=120, mode="decoder", device="cpu", patch_size=PATCH)
    assert seen and all(p == ((1, 2),) for p in seen)


def test_ct_contract_finetunes_and_scores_on_the_body_box(monkeypatch) -> None:
    """A CT model segments only the body's box; fine-tuning trains and scores there too (as the base trained)."""
    import dataclasses

    import napari_medmamba.training.finetune as ft
    from napari_medmamba.io.volume import Geometry, Volume
    from napari_medmamba.models.registry import ModelSpec
    from test_inference_support import TinyUNet, contract

    ct = contract(orientation=None, target_spacing=None, normalization="ct", patch=(8, 64, 64),
                  ct_window=(-1000.0, 1000.0), ct_stats=(0.0, 500.0), body_threshold_hu=-500.0)
    spec = ModelSpec(name="tiny_ct", factory=lambda: TinyUNet(), contract=ct)
    hu = np.full((16, 64, 64), -1000.0, np.float32)  # air, and a 20-voxel-wide body in the middle
    hu[:, 22:42, 22:42] = 40.0
    labels = np.zeros(hu.shape, np.int64)
    labels[:, 28:36, 28:36] = 1
    log = EditLog(hu.shape)
    for z in range(0, 16, 2):
        log.accept_slice(0, z)
    volume = Volume(hu, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    shapes, scored = [], []
    real_augment, real_dice = ft.augment_batch, ft._dice
    monkeypatch.setattr(ft, "augment_batch", lambda x, *a, **k: shapes.append(tuple(x.shape[2:])) or real_augment(x, *a, **k))
    monkeypatch.setattr(ft, "_dice", lambda net, ex, *a, **k: scored.extend(p.image.shape for p, _ in ex) or real_dice(net, ex, *a, **k))
    ft.finetune(spec, [CorrectionExample(volume, labels, log)], max_steps=2, budget_s=60, mode="full", device="cpu",
                patch_size=(8, 64, 64), eval_every=1)
    box = (16, 20 + 2 * 12, 20 + 2 * 12)  # the body plus a 12 mm margin on each side (1 mm voxels), whole z
    assert shapes and all(s[1] <= box[1] and s[2] <= box[2] for s in shapes), shapes
    assert scored and all(s == box for s in scored), scored
    no_crop = dataclasses.replace(spec, contract=dataclasses.replace(ct, body_threshold_hu=None))
    shapes.clear()
    ft.finetune(no_crop, [CorrectionExample(volume, labels, log)], max_steps=1, budget_s=60, mode="full", device="cpu",
                patch_size=(8, 64, 64), eval_every=1)
    assert shapes and shapes[0][1:] == (64, 64)
