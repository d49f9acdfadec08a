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


@pytest.mark.parametrize("command", [[], ["demo"], ["segment"], ["models"], ["info"]])
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
