"""The command line behaves like a Unix tool: --help, exit codes, progress on stderr, JSON for scripts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from napari_medmamba.cli import main
from napari_medmamba.io import read_volume


@pytest.mark.parametrize("command", [[], ["demo"], ["segment"], ["models"], ["info"], ["finetune"], ["export"], ["train"], ["bench"]])
def test_help_everywhere(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: napari-medmamba" in capsys.readouterr().out


def test_usage_error_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["segment"])  # inputs and -o are required
    assert exit_info.value.code == 2


def test_models_json_lists_the_registry(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"lightm_unet_3d", "lightm_unet_2d", "mhs_vm_2d", "unet_3d"} <= names
    assert sum(r["default"] for r in rows) == 1


def test_info_on_dicom_and_on_a_missing_file(dicom_series: Path, capsys, tmp_path: Path) -> None:
    assert main(["info", str(dicom_series), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape_zyx"] == [20, 512, 512] and info["modality"] == "CT"
    assert main(["info", str(tmp_path / "missing.nii.gz")]) == 1
    assert "missing.nii.gz" in capsys.readouterr().err


def test_segment_batch_goes_on_after_a_bad_case_and_resumes(hippocampus: Path, tmp_path: Path, capsys) -> None:
    good = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[:2]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a scan")
    out = tmp_path / "out"
    args = ["segment", str(good[0]), str(good[1]), str(bad), "-o", str(out), "--model", "unet_3d", "--json"]
    assert main(args) == 1  # one case failed
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["failed"] == 1
    assert "broken" in captured.err and "%" in captured.err  # progress and the failure on stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"] + [rows[2]["status"]] and rows[2]["status"].startswith("failed")
    for row, src in zip(rows[:2], good):
        labels, scan = read_volume(row["output"]), read_volume(src)
        assert labels.shape == scan.shape and labels.geometry.isclose(scan.geometry)
        assert float(row["anterior hippocampus_ml"]) >= 0
    assert not list(out.glob(".*tmp*"))  # no half-written files left behind
    # second run: finished cases are skipped, not redone
    before = {p: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")}
    assert main(["segment", str(good[0]), str(good[1]), "-o", str(out), "--model", "unet_3d", "-q"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")} == before


def test_demo_runs_offline_on_the_bundled_sample(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "napari_medmamba.cli", "demo", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    labels, scan = read_volume(row["output"]), read_volume(row["scan"])
    assert labels.shape == scan.shape == (36, 52, 36) and labels.geometry.isclose(scan.geometry)
    assert "--model lightm_unet_3d_hn_oar" in proc.stderr  # one line on how to run the CT model on one's own CT


def test_export_writes_each_format_on_the_scan_grid(dicom_series: Path, tmp_path: Path, capsys) -> None:
    import numpy as np

    from napari_medmamba.io import write_labels

    scan = read_volume(dicom_series)
    labels = np.zeros(scan.shape, np.uint8)
    labels[5:9, 200:260, 220:300] = 1
    labels_path = write_labels(labels, like=scan, path=tmp_path / "case_labels.nii.gz")
    out = tmp_path / "export"
    code = main(["export", str(labels_path), "--scan", str(dicom_series), "-o", str(out),
                 "--formats", "nrrd", "dicom_seg", "csv", "json", "--json"])
    assert code == 0, capsys.readouterr().err
    written = [Path(p) for p in json.loads(capsys.readouterr().out)["written"]]
    assert {p.suffix for p in written} >= {".nrrd", ".dcm", ".csv", ".json"}
    nrrd = read_volume(next(p for p in written if p.suffix == ".nrrd"))
    assert nrrd.geometry.isclose(scan.geometry) and (nrrd.array == labels).all()
    rows = list(csv.DictReader(next(p for p in written if p.suffix == ".csv").open()))
    expected_ml = labels.sum() * scan.geometry.voxel_volume_ml
    assert any(abs(float(r["volume_ml"]) - expected_ml) < 1e-3 for r in rows if r["label_value"] == "1")
    assert main(["export", str(labels_path), "--scan", str(dicom_series), "-o", str(out), "--formats", "png"]) == 2


def test_train_on_a_folder_writes_weights_card_and_split(hippocampus: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for src in sorted((hippocampus / sub).glob("hippocampus_00*.nii.gz"))[:4]:
            (data / sub / src.name).symlink_to(src)
    out = tmp_path / "run"
    code = main(["train", str(data), "-o", str(out), "--model", "unet_3d", "--max-steps", "2", "--batch-size", "2",
                 "--patch-size", "16", "16", "16", "--budget-s", "120", "--device", "cpu", "--width", "8", "--json"])
    assert code == 0
    card = json.loads(capsys.readouterr().out)
    assert card["architecture_config"]["features"] == [8, 16, 32, 64]
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3 and not set(split["val"]) & set(split["train"])
    assert card["training"]["steps"] == 2 and (out / "weights.safetensors").is_file()
    assert card["validation_dice"]["n_cases"] == 1


def test_bench_reports_scan_and_segmentation_times(capsys) -> None:
    assert main(["bench", "--repeats", "1", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and len(info["results"]) == 3
    assert all(r["seconds"] > 0 for r in info["results"])
    assert "(cpu)" in info["results"][0]["what"] and "lightm_unet_3d" in info["results"][-1]["what"]


def _echo_net(contract):
    """A network labelling a CT voxel k where its intensity is 100 k HU (it undoes the CT normalisation)."""
    import torch

    class EchoNet(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hu = x * contract.ct_stats[1] + contract.ct_stats[0]
            centres = 100.0 * torch.arange(contract.num_classes, dtype=x.dtype).view(1, -1, 1, 1, 1)
            return -(((hu - centres) / 25.0) ** 2)

    return EchoNet()


@pytest.fixture()
def ct_organs_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CT scan whose voxels are 100 x (organ label): a right parotid with a stray blob and a spinal cord in
    two pieces; ``lightm_unet_3d_hn_oar`` is replaced by a network echoing those labels (its real contract,
    small patch, no resampling)."""
    import dataclasses

    import numpy as np

    from napari_medmamba import inference
    from napari_medmamba.io import write_volume
    from napari_medmamba.io.volume import Geometry, Volume
    from napari_medmamba.models import get_model_spec

    labels = np.zeros((24, 16, 16), np.int16)
    labels[2:6, 2:6, 2:6] = 3  # right parotid, 64 voxels
    labels[2:4, 12:14, 12:14] = 3  # a stray blob, 8 voxels
    labels[8:14, 7:9, 7:9] = 2  # spinal cord, two pieces of 24 voxels
    labels[16:22, 7:9, 7:9] = 2
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    scan = write_volume(Volume((100.0 * labels).astype(np.float32), geometry, modality="CT"), tmp_path / "hn.nii.gz")
    spec = get_model_spec("lightm_unet_3d_hn_oar")
    contract = dataclasses.replace(spec.contract, patch_size=(8, 16, 16), target_spacing=None, pad_to_patch=False)
    monkeypatch.setattr(inference, "resolve_model", lambda name: (_echo_net(contract), contract, spec.name, []))
    return scan


@pytest.mark.parametrize("option, parotid, cord", [([], 64, 48), (["--postprocess", "recommended"], 64, 48),
                                                   (["--postprocess", "none"], 72, 48),
                                                   (["--postprocess", "largest"], 64, 24)])
def test_segment_postprocess_option_reaches_the_engine(ct_organs_in_pieces: Path, tmp_path: Path, capsys,
                                                       option: list[str], parotid: int, cord: int) -> None:
    import numpy as np

    out = tmp_path / "out"
    args = ["segment", str(ct_organs_in_pieces), "-o", str(out), "--model", "lightm_unet_3d_hn_oar", "--json", "-q"]
    assert main(args + option) == 0
    row = json.loads(capsys.readouterr().out)["cases"][0]
    labels = np.rint(read_volume(row["output"]).array).astype(int)
    assert np.count_nonzero(labels == 3) == parotid and np.count_nonzero(labels == 2) == cord
    choice = option[1] if option else "recommended"
    assert row["postprocess"].split(":")[0] == choice
    if choice == "recommended":  # per organ: the parotids, not the spinal cord
        assert "right parotid" in row["postprocess"] and "spinal cord" not in row["postprocess"]
    assert list(csv.DictReader((out / "summary.csv").open()))[0]["postprocess"] == row["postprocess"]


def test_segment_mirror_option_reaches_the_engine(ct_organs_in_pieces: Path, tmp_path: Path, monkeypatch) -> None:
    from napari_medmamba import inference

    seen: list[bool] = []
    real = inference.segment
    monkeypatch.setattr(inference, "segment", lambda *a, **k: seen.append(k["mirror"]) or real(*a, **k))
    args = ["segment", str(ct_organs_in_pieces), "-o", str(tmp_path / "out"), "--model", "lightm_unet_3d_hn_oar", "-q"]
    assert main(args + ["--mirror"]) == 0 and main(args + ["--overwrite"]) == 0
    assert seen == [True, False]


def test_segment_postprocess_option_in_help_and_checked(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "--postprocess {recommended,none,largest}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "scan.nii.gz", "-o", "out", "--postprocess", "biggest"])
    assert exit_info.value.code == 2
