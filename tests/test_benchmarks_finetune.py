"""Smoke tests of benchmarks/finetune.py (simulated user, few-shot new structure, second clinic's style), CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "finetune.py"
DATA = Path(os.environ.get("MEDMAMBA_SHARED_DATA") or ROOT.parent / "shared" / "data")

needs_hippo_ct = pytest.mark.skipif(not (DATA / "msd_hippocampus").is_dir() or not (DATA / "totalseg").is_dir(),
                                    reason="needs ../shared/data (msd_hippocampus, totalseg)")
needs_openkbp = pytest.mark.skipif(not (DATA / "openkbp" / "cases.tsv").is_file(),
                                   reason="needs ../shared/data/openkbp")


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scanner_shift_is_deterministic_and_degrades() -> None:
    bench = _load()
    a = np.random.default_rng(0).random((12, 10, 9)).astype(np.float32) * 300
    s1, s2 = bench.scanner_shift(a, 1.0, 0, 5), bench.scanner_shift(a, 1.0, 0, 5)
    assert s1.dtype == np.float32 and s1.shape == a.shape and np.array_equal(s1, s2)
    assert not np.array_equal(s1, bench.scanner_shift(a, 1.0, 0, 6))  # noise follows the case seed
    clean = bench.scanner_shift(a, 0.0)
    assert clean.min() >= 0 and clean.max() <= 1
    assert np.abs(np.diff(s1, axis=0)).mean() < np.abs(np.diff(clean, axis=0)).mean()  # thick slices: z smoother


def test_worst_slices_pick_lowest_dice() -> None:
    bench = _load()
    ref = np.zeros((5, 4, 4), int)
    ref[1:4, 1:3, 1:3] = 1
    pred = ref.copy()
    pred[2] = 0  # slice 2 entirely missed
    assert bench.worst_slices(pred, ref, [1], 1) == [2]
    assert bench.spread_slices(ref > 0, 1) == [2]


@needs_hippo_ct
def test_benchmark_smallest_setting_end_to_end(tmp_path) -> None:
    bench = _load()
    out = tmp_path / "ft"
    bench.main(["--device", "cpu", "--cases", "1", "--other", "1", "--k", "2", "--modes", "decoder",
                "--max-steps", "2", "--budget-s", "600", "--patch", "8", "32", "32", "--ct-margin", "0",
                "--ct-slices", "6", "--out", str(out)])
    data = json.loads((out / "finetune.json").read_text())
    assert data["meta"]["device"] and data["meta"]["command"].startswith("python benchmarks/finetune.py")
    shift, new = data["shift"], data["newstruct"]
    assert [c["role"] for c in shift["cases"]] == ["corrected", "other"]
    assert len(shift["runs"]) == 1 and len(new["runs"]) == 1
    run = shift["runs"][0]
    assert run["k"] == 2 and run["mode"] == "decoder" and run["steps"] == 2 and len(run["slices"][0]) == 2
    for key in ("corrected_before", "corrected_after", "other_before", "other_after", "finetune_s"):
        assert math.isfinite(run[key]), key
    for key in ("corrected_before", "corrected_after", "other_before", "other_after"):
        assert 0.0 <= run[key] <= 1.0, key
    assert shift["cases"][0]["base_dice_shifted"] < shift["cases"][0]["base_dice_clean"]  # the shift hurts
    nrun = new["runs"][0]
    assert nrun["labels"][-1] == new["structure"] == "spleen" and nrun["before"] == 0.0
    assert math.isfinite(nrun["after"]) and 0.0 <= nrun["after"] <= 1.0 and nrun["steps"] == 2
    assert not (out / "finetune.png").exists()  # no plot unless asked


# ---- part "clinic" (issue #13): a second clinic's parotid margin ----------------------------------------------

SPACING_ZYX = (2.5, 4.0, 4.0)


def _synthetic_hn(full_z: bool = False):
    """A small synthetic 'head-and-neck' label map: two box parotids (3, 4; on every slice with ``full_z``), a
    mandible (7) touching the right parotid, a spinal cord (2); and a CT-like volume of it (HU per organ + noise),
    spacing 2.5 x 4 x 4 mm."""
    from napari_medmamba.io.volume import Geometry, Volume

    labels = np.zeros((16, 48, 48), np.int64)
    zs = slice(None) if full_z else slice(4, 12)
    labels[zs, 12:20, 6:14] = 3
    labels[zs, 12:20, 34:42] = 4
    labels[4:12, 20:24, 6:14] = 7  # touches the right parotid along y
    labels[:, 30:34, 22:26] = 2
    hu = np.array([40, 30, 35, -20, -20, 40, 40, 900], np.float32)[labels]
    hu += np.random.default_rng(0).normal(scale=10, size=hu.shape).astype(np.float32)
    geometry = Geometry((SPACING_ZYX[2], SPACING_ZYX[1], SPACING_ZYX[0]), (0.0, 0.0, 0.0),
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return Volume(hu, geometry, modality="CT"), labels


def _extent(mask: np.ndarray) -> list[tuple[int, int]]:
    idx = np.nonzero(mask)
    return [(int(i.min()), int(i.max())) for i in idx]


def test_grow_labels_respects_margin_in_mm_and_other_organs() -> None:
    bench = _load()
    _, labels = _synthetic_hn()
    for margin, grow_zyx in ((4.0, (1, 1, 1)), (8.0, (3, 2, 2))):  # z: 2.5 mm voxels, y/x: 4 mm voxels
        out = bench.grow_labels(labels, SPACING_ZYX, margin)
        assert out.dtype == labels.dtype and out.shape == labels.shape
        changed = out != labels
        assert changed.any() and (labels[changed] == 0).all()  # grown voxels only take background
        assert np.isin(out[changed], bench.PAROTIDS).all()
        for c in (2, 7):  # other organs untouched, voxel for voxel
            assert np.array_equal(out == c, labels == c)
        for c in bench.PAROTIDS:
            assert (out == c).sum() > (labels == c).sum()
            dist = ndimage.distance_transform_edt(labels != c, sampling=SPACING_ZYX)
            assert dist[(out == c) & (labels != c)].max() <= margin + 1e-6  # nothing beyond the margin
            reach = (dist <= margin) & (labels == 0)
            assert np.isin(out[reach], bench.PAROTIDS).all()  # every background voxel in reach was taken
        # left parotid (free-standing box): the extent grows by the margin in voxels along each axis
        (z0, z1), (y0, y1), (x0, x1) = _extent(labels == 4)
        gz, gy, gx = grow_zyx
        assert _extent(out == 4) == [(z0 - gz, z1 + gz), (y0 - gy, y1 + gy), (x0 - gx, x1 + gx)]
        # the right parotid does not grow through the mandible below it
        assert not (out[4:12, 20:24, 6:14] == 3).any()
    assert np.array_equal(bench.grow_labels(labels, SPACING_ZYX, 0.0), labels)


def test_worst_slices_by_voxels_and_clinic_correction() -> None:
    bench = _load()
    volume, labels = _synthetic_hn()
    labels[labels == 7] = 0  # this case has no mandible contour (partial labels)
    case = bench.clinic_case("synthetic", volume, labels, (2, 3, 4), 4.0)
    pred = case["clinic"].copy()
    pred[6] = np.where(pred[6] == 3, 0, pred[6])  # slice 6: the right parotid missed entirely
    pred[9] = np.where(pred[9] == 4, 0, pred[9])
    pred[9, 14:16, 36:38] = 4  # slice 9: most of the left parotid missed, fewer voxels than slice 6
    assert bench.worst_slices(pred, case["clinic"], bench.PAROTIDS, 1, by="voxels") == [6]
    assert bench.worst_slices(pred, case["clinic"], bench.PAROTIDS, 2, by="voxels") == [6, 9]
    assert bench.worst_slices(pred, case["clinic"], bench.PAROTIDS, 1) == [6]  # by Dice: slice 6 scores 0 for class 3
    with pytest.raises(ValueError):
        bench.worst_slices(pred, labels, [3], 1, by="nope")
    pred[5, 20:24, 6:14] = 7  # the model predicts a mandible (the user has no contour for it), 8 voxels wrong
    example, zs = bench.clinic_correction(case, pred, 3)
    assert zs == [5, 6, 9]
    reviewed = example.edit_log.reviewed_mask(labels.shape)
    assert reviewed[zs].all() and not np.delete(reviewed, zs, axis=0).any()
    for z in zs:  # corrected slices: the clinic style, except that the uncontoured mandible stays where it is background
        keep = (pred[z] == 7) & (case["clinic"][z] == 0)
        assert np.array_equal(example.labels[z][keep], pred[z][keep])
        assert np.array_equal(example.labels[z][~keep], case["clinic"][z][~keep])
    assert (example.labels[5] == 7).sum() == 24 and (example.labels[5, 20] == 3).sum() == 8  # parotid margin wins
    rest = [z for z in range(labels.shape[0]) if z not in zs]
    assert np.array_equal(example.labels[rest], pred[rest])


def test_clinic_experiment_report_on_synthetic_data() -> None:
    """The whole clinic part on tiny synthetic data with a tiny untrained LightM-UNet (no fine-tuning steps, so
    the fine-tuned model is the base: before must equal after, which checks masks and bookkeeping)."""
    import torch

    bench = _load()
    from napari_medmamba.models import get_model_spec
    from napari_medmamba.models.lightm_unet import LightMUNet

    torch.set_num_threads(2)

    def tiny() -> LightMUNet:
        torch.manual_seed(0)
        return LightMUNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=8, blocks_down=(1, 1, 1),
                          blocks_up=(1, 1))

    hn = get_model_spec("lightm_unet_3d_hn_oar")
    spec = dataclasses.replace(hn, name="tiny_hn_test", factory=tiny, weights=None, sha256=None, card={},
                               contract=dataclasses.replace(hn.contract, patch_size=(16, 48, 48)))
    user_volume, user_labels = _synthetic_hn(full_z=True)  # every slice the user corrects has parotid voxels
    users = [bench.clinic_case("u1", user_volume, user_labels, (2, 3, 4, 7), 4.0)]
    volume, labels = _synthetic_hn()
    shifted = np.roll(labels, 2, axis=2)
    other_volume = type(volume)(np.roll(volume.array, 2, axis=2), volume.geometry, modality="CT")
    others = [bench.clinic_case("o1", other_volume, shifted, (2, 3, 4, 7), 4.0)]
    args = bench.parse_args(["--parts", "clinic", "--k", "1", "3", "--max-steps", "0", "--budget-s", "60",
                             "--patch", "8", "32", "32", "--device", "cpu"])
    assert args.clinic_modes == ["decoder"] and args.modes == ["decoder", "full"]
    out = bench.clinic_experiment(spec, users, others, args)
    assert [c["role"] for c in out["cases"]] == ["user", "other"] and out["margin_mm"] == 4.0
    assert [(r["k"], r["mode"]) for r in out["runs"]] == [(1, "decoder"), (3, "decoder")]
    organs = list(out["labels"][1:])
    for r in out["runs"]:
        assert r["steps"] == 0 and len(r["slices"]) == 1 and len(r["slices"][0]) == r["k"]
        for group in ("user", "other"):
            g = r[group]
            for key in ("parotids_before", "parotids_after", "other_organs_before", "other_organs_after",
                        "parotids_reference_before", "parotids_reference_after", "parotid_ml_before",
                        "parotid_ml_after", "parotid_ml_clinic", "parotid_ml_reference"):
                assert key in g and (math.isnan(g[key]) or g[key] >= 0), key
            assert set(g["dice_before"]) == set(g["dice_after"]) == set(g["dice_change"]) == set(organs)
            assert math.isnan(g["dice_before"]["esophagus"])  # not contoured: not scored
            for key in ("parotids", "other_organs", "parotid_ml"):  # zero steps: the base is kept
                a, b = g[f"{key}_before"], g[f"{key}_after"]
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), key
            assert len(g["cases"]) == 1
        # user cases are scored on their untouched slices only (the corrected ones hold clinic parotid voxels)
        u, zs = users[0], r["slices"][0]
        keep = np.ones(labels.shape, bool)
        keep[zs] = False
        ml = {side: float((u["clinic"][keep] == c).sum()) * u["voxel_ml"] for side, c in zip(("right parotid",
                                                                                             "left parotid"), bench.PAROTIDS)}
        assert r["user"]["cases"][0]["ml_clinic"] == pytest.approx(ml)
        assert sum(ml.values()) < float(np.isin(u["clinic"], bench.PAROTIDS).sum()) * u["voxel_ml"]
        # the style is a margin: the clinic's parotids are larger than the reference's, by a plausible amount
        o = r["other"]
        assert o["parotid_ml_clinic"] > o["parotid_ml_reference"] > 0
        box_ml = 8 * 8 * 8 * 2.5 * 4 * 4 / 1000
        assert o["parotid_ml_reference"] == pytest.approx(box_ml)
    json.dumps(out, default=float)  # serialisable as the benchmark writes it
    result = {"meta": {"date": "d", "machine": "m", "device": "cpu"}, "clinic": out}
    bench.print_tables(result)


@needs_openkbp
def test_clinic_cases_from_the_openkbp_split() -> None:
    bench = _load()
    users, others = bench.clinic_case_ids(2, 0, 4.0)
    assert len(users) == 2 and not set(users) & set(others)
    assert users == ["pt_4", "pt_104"]  # in-plane voxels <= 4 mm (3.906, 3.92), then 7 and 6 organs contoured
    assert bench.clinic_case_ids(1, 3, 6.0) == (["pt_100"], ["pt_10", "pt_104", "pt_112"])  # all <= 6 mm in-plane
    assert "pt_15" not in users + others and "pt_94" not in users + others  # a parotid not contoured
    val = json.loads(bench.OPENKBP_SPLIT.read_text())["val"]
    assert set(users + others) <= set(val) and len(users + others) == 14
    (case,) = bench.load_clinic_cases(users[:1], 4.0)
    assert len(case["labelled"]) == 7  # user cases: every organ contoured
    ref, clinic = case["ref"], case["clinic"]
    for c in bench.PAROTIDS:
        assert (clinic == c).sum() > 1.2 * (ref == c).sum()
    for c in (1, 2, 5, 6, 7):
        assert np.array_equal(clinic == c, ref == c)
