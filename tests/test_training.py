"""Training: cache, split, loss, Dice, trainer checkpoint/resume, weights and model card (CPU, small)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medmamba.training.augment import PatchSampler, augment_batch
from napari_medmamba.training.dataset import CachedCases, build_cache, load_case_folder
from napari_medmamba.training.losses import dice_ce_loss, dice_per_class
from napari_medmamba.training.splits import DEFAULT_SPLIT, load_split, make_split


@pytest.fixture(scope="module")
def cache(hippocampus, tmp_path_factory):
    cases = load_case_folder(hippocampus)[:4]
    return build_cache(cases, tmp_path_factory.mktemp("cache") / "c.npz", source="MSD", licence="CC BY-SA 4.0")


def test_cache_roundtrip(cache, hippocampus):
    c = CachedCases.load(cache)
    assert c.case_ids == ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
    assert all(i.dtype == np.float16 and lb.dtype == np.uint8 and i.shape == lb.shape
               for i, lb in zip(c.images, c.labels))
    assert abs(float(c.images[0].astype(np.float32).mean())) < 1e-2  # z-scored
    assert set(np.unique(c.labels[0])) == {0, 1, 2}


def test_nnunet_layout(tmp_path, hippocampus):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    src = hippocampus / "imagesTr" / "hippocampus_001.nii.gz"
    (tmp_path / "imagesTr" / "case_a_0000.nii.gz").symlink_to(src)
    (tmp_path / "labelsTr" / "case_a.nii.gz").symlink_to(hippocampus / "labelsTr" / "hippocampus_001.nii.gz")
    (tmp_path / "labelsTr" / "._case_a.nii.gz").write_bytes(b"")
    cases = load_case_folder(tmp_path)
    assert [(c.case_id, c.image_path.name) for c in cases] == [("case_a", "case_a_0000.nii.gz")]
    (tmp_path / "labelsTr" / "case_b.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="case_b"):
        load_case_folder(tmp_path)


def test_shipped_split():
    s = load_split(DEFAULT_SPLIT)
    assert len(s["val"]) == 44 and len(s["train"]) == 176 and s["val"] == sorted(s["val"])
    assert not set(s["train"]) & set(s["val"])
    assert s == {**s, **make_split(s["train"] + s["val"], 44, seed=0, dataset=s["dataset"])}


def test_dice_per_class_crafted():
    t = np.zeros((4, 4, 4), int)
    p = np.zeros_like(t)
    t[0, :2] = 1   # 8 voxels of class 1
    p[0, :1] = 1   # 4 of them predicted
    p[3, 3, 3] = 2  # class 2 only in the prediction
    d = dice_per_class(p, t, 3)
    assert d[0] == pytest.approx(2 * 4 / 12) and d[1] == 0.0
    assert np.isnan(dice_per_class(np.zeros_like(t), np.zeros_like(t), 3)).all()


def test_ignore_mask_excludes_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    ignore = torch.zeros_like(target, dtype=torch.bool)
    ignore[:, :2] = True
    base = dice_ce_loss(logits, target, ignore)
    changed_t, changed_l = target.clone(), logits.clone()
    changed_t[:, :2] = (target[:, :2] + 1) % 3
    changed_l[:, :, :2] = torch.randn(2, 3, 2, 4, 4)
    assert torch.allclose(base, dice_ce_loss(changed_l, changed_t, ignore))
    assert not torch.allclose(base, dice_ce_loss(changed_l, changed_t))
    g = logits.clone().requires_grad_()
    dice_ce_loss(g, target, ignore).backward()
    assert g.grad[:, :, :2].abs().max() == 0 and g.grad[:, :, 2:].abs().max() > 0


def test_sampler_and_augment_shapes(cache):
    c = CachedCases.load(cache)
    s = PatchSampler(c.images, c.labels, (40, 56, 40))
    rng = np.random.default_rng(0)
    x, y = s.sample(6, rng)
    assert x.shape == (6, 1, 40, 56, 40) and y.shape == (6, 40, 56, 40) and (y > 0).any()
    xa, ya, m, present = augment_batch(torch.from_numpy(x), torch.from_numpy(y), rng,
                                       mask=torch.from_numpy(y > 0))
    assert present is None
    assert xa.shape == x.shape and ya.shape == y.shape and set(ya.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(m, ya > 0)  # the mask moves exactly like the labels


def test_left_right_flip_swaps_paired_labels_and_their_present_flags():
    """A flipped CT shows the right parotid on the left: labels 3/4 and their partial-label flags swap."""
    from napari_medmamba.models.registry import get_model_spec
    from napari_medmamba.training.augment import AugmentConfig

    pairs = get_model_spec("lightm_unet_3d_hn_oar").contract.lr_label_pairs
    assert pairs == ((3, 4),)
    y = torch.zeros(2, 2, 3, 8, dtype=torch.long)
    y[:, :, :, 1] = 3  # right parotid at low x (RAS); the left one was not contoured; brainstem at x = 4
    y[:, :, :, 4] = 1
    x = y.float().unsqueeze(1)
    present = torch.tensor([[True, True, False, True, False, False, False, False]] * 2)
    rng = np.random.default_rng(0)
    no_aug = dict(p_affine=0.0, p_intensity_scale=0.0, p_shift=0.0, p_gamma=0.0, p_noise=0.0)
    xa, ya, _, pa = augment_batch(x, y, rng, AugmentConfig(p_flip_lr=1.0, **no_aug), lr_label_pairs=pairs,
                                  present=present)
    assert torch.equal(xa[:, 0], y.flip(-1).float())  # the image is mirrored as it is
    assert (ya[..., 6] == 4).all() and (ya[..., 1] == 0).all()  # the gland now on the left is a left parotid
    assert (ya[..., 3] == 1).all()  # other organs just move
    assert pa[:, 4].all() and not pa[:, 3].any()  # the mirrored case contoured its left parotid only
    assert torch.equal(pa[:, [0, 1, 2, 5, 6, 7]], present[:, [0, 1, 2, 5, 6, 7]])
    _, yb, _, pb = augment_batch(x, y, rng, AugmentConfig(p_flip_lr=0.0, **no_aug), lr_label_pairs=pairs,
                                 present=present)
    assert torch.equal(yb, y) and torch.equal(pb, present)
    _, yc, _, _ = augment_batch(x, y, rng, AugmentConfig(p_flip_lr=1.0, **no_aug))  # no pairs: a plain mirror
    assert torch.equal(yc, y.flip(-1))


def test_loss_decreases_on_one_batch(cache):
    from napari_medmamba.models.zoo import build_model
    torch.manual_seed(0)
    c = CachedCases.load(cache)
    x, y = PatchSampler(c.images, c.labels, (16, 16, 16), fg_fraction=1.0).sample(2, np.random.default_rng(0))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model = build_model("unet_3d")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = dice_ce_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_train_resume_weights_card(cache, tmp_path):
    from napari_medmamba.models.checkpoints import load_checkpoint
    from napari_medmamba.training.trainer import train

    kw = dict(val_ids=["hippocampus_006"], batch_size=2, patch_size=(16, 16, 16), device="cpu",
              budget_s=1e6, log=lambda s: None)
    card = train("unet_3d", cache, tmp_path, max_steps=2, **kw)
    assert card["training"]["steps"] == 2 and card["training"]["resumed_from_step"] is None
    # an MR model is trained on whole volumes; the card says so (a CT contract would say it cuts to the body)
    assert card["training"]["cases"] == "whole volumes" and card["input_contract"]["body_threshold_hu"] is None
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["model_name"] == "unet_3d"
    card = train("unet_3d", cache, tmp_path, max_steps=3, **kw)
    assert card["training"]["resumed_from_step"] == 2 and card["training"]["steps"] == 3
    weights = tmp_path / "weights.safetensors"
    assert card["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    on_disk = json.loads((tmp_path / "model_card.json").read_text())
    assert on_disk["weights_sha256"] == card["weights_sha256"]
    assert set(on_disk["validation_dice"]["per_class"]) == {"anterior hippocampus", "posterior hippocampus"}
    assert on_disk["training_data"]["licence"] == "CC BY-SA 4.0" and "hippocampus_006" in on_disk["training_data"]["val_cases"]
    model = load_checkpoint(weights)
    assert type(model).__name__ == "UNet" and next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="overlap|not"):
        train("unet_3d", cache, tmp_path / "x", max_steps=1,
              split={"train": ["hippocampus_006"], "val": ["hippocampus_006"]}, **{**kw, "val_ids": None})


def test_trainer_cli_passes_the_loss_options_to_the_loss(cache, tmp_path, monkeypatch):
    import napari_medmamba.training.trainer as trainer

    seen = []

    def recording_loss(*args, **kwargs):
        seen.append((kwargs.get("ce_top_k"), kwargs.get("class_balanced_ce")))
        return dice_ce_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "dice_ce_loss", recording_loss)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_003", "hippocampus_004"],
                                 "val": ["hippocampus_006"]}))
    assert trainer.main(["--model", "unet_3d", "--cache", str(cache), "--out", str(tmp_path / "run"),
                         "--budget-s", "1e6", "--max-steps", "1", "--batch-size", "2", "--patch-size", "16", "16",
                         "16", "--device", "cpu", "--split", str(split), "--ce-top-k", "0.1",
                         "--class-balanced-ce", "0.5", "--width", "8"]) == 0
    assert seen == [(0.1, 0.5)]
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    loss = card["training"]["loss"]
    assert "top-0.1 cross-entropy" in loss and "0.5 x class-balanced cross-entropy" in loss
    assert card["architecture_config"]["features"] == [8, 16, 32, 64]  # --width: the network's first level


def test_trainer_activation_checkpointing_levels(cache, tmp_path):
    """``--activation-checkpointing 0`` recomputes only the full-resolution Mamba layers (the setting that met
    issue #12's time and memory together on an H200); no value means levels 0 and 1; the card records them."""
    import napari_medmamba.training.trainer as trainer

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_003"], "val": ["hippocampus_006"]}))
    common = ["--model", "lightm_unet_3d", "--cache", str(cache), "--budget-s", "1e6", "--batch-size", "2",
              "--patch-size", "16", "16", "16", "--device", "cpu", "--split", str(split), "--width", "8"]
    levels = {}
    for name, extra in (("l0", ["--activation-checkpointing", "0"]), ("both", ["--activation-checkpointing"]),
                        ("off", [])):
        assert trainer.main(common + ["--out", str(tmp_path / name), "--max-steps", "1" if name == "l0" else "0"]
                            + extra) == 0
        card = json.loads((tmp_path / name / "model_card.json").read_text())
        levels[name] = card["training"]["activation_checkpointing_levels"]
    assert levels == {"l0": [0], "both": [0, 1], "off": []}


def test_trainer_path_needs_no_simpleitk_or_qt():
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name.split('.')[0] in {'SimpleITK', 'nibabel', 'napari', 'qtpy'}: raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "import napari_medmamba.training.trainer as t\n"
        "assert callable(t.train)\n"
        # a CT model's training cuts cases to the body (inference.body_crop): importable without SimpleITK, while
        # the engine itself still needs it (the inference package loads its names lazily)
        "import napari_medmamba.inference.body_crop\n"
        "import napari_medmamba.inference as inf\n"
        "try:\n    inf.segment\nexcept ImportError:\n    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "lazy"


def test_partial_label_loss_marginalises_uncontoured_classes():
    """A class a sample did not contour is never taught as background: with it merged into background, moving
    probability between background and that class does not change the loss; without partial labels the loss
    equals plain CE + soft Dice."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, 7)
    target = torch.randint(0, 4, (2, 5, 6, 7))
    target[1][target[1] == 2] = 0
    full = dice_ce_loss(logits, target)
    assert torch.allclose(full, dice_ce_loss(logits, target, present=torch.ones(2, 4, dtype=torch.bool)))
    probs = logits.softmax(1)
    onehot = F.one_hot(target, 4).movedim(-1, 1).float()
    inter, denom = (probs * onehot).sum((0, 2, 3, 4)), (probs + onehot).sum((0, 2, 3, 4))
    expected = F.cross_entropy(logits, target) + 1 - ((2 * inter + 1e-5) / (denom + 1e-5))[1:].mean()
    assert torch.allclose(full, expected, atol=1e-5)

    present = torch.ones(2, 4, dtype=torch.bool)
    present[1, 2] = False
    base = dice_ce_loss(logits, target, present=present)
    shifted = logits.clone()
    bg = target[1] == 0  # sample 1: swap background and the uncontoured class 2 where the label is 0
    shifted[1, 0][bg], shifted[1, 2][bg] = logits[1, 2][bg], logits[1, 0][bg]
    assert torch.allclose(dice_ce_loss(shifted, target, present=present), base, atol=1e-6)
    assert float(dice_ce_loss(shifted, target) - full) != pytest.approx(0.0, abs=1e-3)  # the plain loss sees it
    present[0, 1] = False  # sample 0's class-1 voxels, labelled 1, still count: present only widens background
    assert torch.isfinite(dice_ce_loss(logits, target, present=present))


def test_train_2d_model_slicewise_and_warm_restart(cache, tmp_path):
    """2D models train on single axial slices and validate slice by slice; ``init_weights`` starts from saved
    weights (a warm restart) and the card says so."""
    from napari_medmamba.models.checkpoints import load_checkpoint
    from napari_medmamba.training.trainer import train

    kw = dict(val_ids=["hippocampus_006"], batch_size=2, device="cpu", budget_s=1e6, log=lambda s: None, max_steps=1)
    card = train("lightm_unet_2d", cache, tmp_path / "a", patch_size=(16, 16), **kw)
    assert card["training"]["patch_size"] == [1, 16, 16]  # one slice per patch
    assert card["input_contract"]["spatial_dims"] == 2
    dice = card["validation_dice"]["per_class"]
    assert set(dice) == {"anterior hippocampus", "posterior hippocampus"}
    assert all(0.0 <= d["mean"] <= 1.0 for d in dice.values())

    first = train("unet_3d", cache, tmp_path / "b", patch_size=(16, 16, 16), **kw)
    assert first["training"]["initialised_from"] is None
    init = tmp_path / "b" / "weights.safetensors"
    card = train("unet_3d", cache, tmp_path / "c", patch_size=(16, 16, 16), init_weights=init,
                 **{**kw, "max_steps": 0})
    assert card["training"]["initialised_from"] == "weights.safetensors"
    start, restarted = load_checkpoint(init), load_checkpoint(tmp_path / "c" / "weights.safetensors")
    for (k, a), (_, b) in zip(start.state_dict().items(), restarted.state_dict().items()):
        assert torch.equal(a, b), k  # no step taken: the restart holds exactly the initial weights


def test_top_k_cross_entropy_keeps_only_the_hardest_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    target = torch.randint(0, 3, (2, 4, 5, 6))
    ignore = torch.zeros(2, 4, 5, 6, dtype=torch.bool)
    ignore[:, :2] = True
    dice_only = dice_ce_loss(logits, target, ignore) - F.cross_entropy(logits, target, reduction="none")[~ignore].mean()
    ce = F.cross_entropy(logits, target, reduction="none")[~ignore]
    hardest = ce.sort(descending=True).values[: int(0.25 * ce.numel())].mean()
    assert torch.allclose(dice_ce_loss(logits, target, ignore, ce_top_k=0.25), dice_only + hardest, atol=1e-6)
    assert torch.allclose(dice_ce_loss(logits, target, ignore, ce_top_k=1.0), dice_ce_loss(logits, target, ignore))
    with pytest.raises(ValueError, match="ce_top_k"):
        dice_ce_loss(logits, target, ce_top_k=0.0)


def test_class_balanced_cross_entropy_weighs_every_labelled_class_alike():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 2, 4, 4)
    target = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    target[0, 0, 0, 0] = 2  # one voxel of class 2, none of class 1
    ce = F.cross_entropy(logits, target, reduction="none")
    balanced = (ce[target == 0].mean() + ce[target == 2].mean()) / 2
    base = dice_ce_loss(logits, target)
    assert torch.allclose(dice_ce_loss(logits, target, class_balanced_ce=0.5), base + 0.5 * balanced, atol=1e-6)
