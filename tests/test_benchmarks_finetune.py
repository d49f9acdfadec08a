"""Smoke test of benchmarks/finetune.py (simulated user + few-shot new structure), smallest setting, CPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "finetune.py"
DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not (DATA / "msd_hippocampus").is_dir() or not (DATA / "totalseg").is_dir(),
                                reason="needs ../shared/data (msd_hippocampus, totalseg)")


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
