"""``napari-medmamba finetune``: corrected cases on disk -> a new model in the store, usable by name."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from napari_medmamba.annotation.edit_log import EditLog
from napari_medmamba.cli import main
from napari_medmamba.io import read_volume, write_labels
from napari_medmamba.models.registry import REGISTRY


@pytest.fixture()
def corrected_case(hippocampus: Path, tmp_path: Path) -> tuple[Path, Path]:
    """One hippocampus scan with a 'corrected' label map (ground truth) and an edit log reviewing 6 slices."""
    scan = hippocampus / "imagesTr" / "hippocampus_001.nii.gz"
    truth = read_volume(hippocampus / "labelsTr" / "hippocampus_001.nii.gz")
    labels_dir = tmp_path / "corrected"
    labels_dir.mkdir()
    labels = np.rint(truth.array).astype(np.uint8)
    write_labels(labels, like=truth, path=labels_dir / "hippocampus_001_labels.nii.gz")
    log = EditLog(labels.shape)
    for z in np.flatnonzero(labels.any(axis=(1, 2)))[::3][:6]:
        log.accept_slice(0, int(z))
    log.save(labels_dir / "hippocampus_001_edits.npz")
    return scan, labels_dir


def test_finetune_cli_end_to_end(corrected_case, tmp_path: Path, monkeypatch, capsys) -> None:
    scan, labels_dir = corrected_case
    store = tmp_path / "store"
    monkeypatch.setenv("MEDMAMBA_MODELS_DIR", str(store))
    try:
        code = main(["finetune", str(scan), "--labels", str(labels_dir), "--max-steps", "2", "--device", "cpu",
                     "--name", "hippo-ft-test", "--json", "-q"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        card = json.loads(captured.out)
        assert card["model_name"] == "hippo-ft-test" and card["base_model"] == "lightm_unet_3d"
        assert card["steps"] == 2 and len(card["data_fingerprint"]) == 64
        assert str(scan) not in json.dumps(card) and "hippocampus_001" not in json.dumps(card)  # no paths/ids
        for f in ("hippo-ft-test.safetensors", "hippo-ft-test.json"):
            assert stat.S_IMODE((store / f).stat().st_mode) == 0o600
        assert stat.S_IMODE(store.stat().st_mode) == 0o700
        assert "saved hippo-ft-test" in captured.err

        assert main(["models", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert any(r["name"] == "hippo-ft-test" and r.get("finetuned") for r in rows)

        REGISTRY.pop("hippo-ft-test", None)  # a new process: found in the store by name
        out = tmp_path / "seg"
        assert main(["segment", str(scan), "-o", str(out), "--model", "hippo-ft-test", "--device", "cpu", "-q"]) == 0
        assert (out / "hippocampus_001_labels.nii.gz").is_file()

        assert main(["models", "--remove", "hippo-ft-test"]) == 0
        assert not (store / "hippo-ft-test.safetensors").exists() and "hippo-ft-test" not in REGISTRY
    finally:
        REGISTRY.pop("hippo-ft-test", None)


def test_finetune_cli_needs_an_edit_log(corrected_case, tmp_path: Path, capsys) -> None:
    scan, labels_dir = corrected_case
    (labels_dir / "hippocampus_001_edits.npz").unlink()
    code = main(["finetune", str(scan), "--labels", str(labels_dir), "--store", str(tmp_path / "s"), "--max-steps", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "hippocampus_001_edits.npz not found" in err and "--whole-labels" in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_models_clear_finetuned(tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    store.mkdir()
    assert main(["models", "--store", str(store), "--clear-finetuned"]) == 0
    assert "removed 0 fine-tuned model(s)" in capsys.readouterr().err
    assert main(["models", "--store", str(store), "--remove", "nope"]) == 1
