"""Volumes CSV and summary JSON."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from napari_medmamba.annotation import EditLog
from napari_medmamba.export import VOLUMES_CSV_COLUMNS, ExportError, export_summary_json, export_volumes_csv
from napari_medmamba.io import Geometry

# x axis flipped, as in many CTs read from DICOM / NIfTI
GEOMETRY = Geometry(spacing=(0.5, 2.0, 4.0), origin=(100.0, -50.0, 10.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))


def _labels() -> np.ndarray:
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:3, 2:5, 0:4] = 1  # z 1..2, y 2..4, x 0..3: 24 voxels
    labels[4, 5, 6] = 9
    return labels


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_volumes_csv(tmp_path: Path) -> None:
    path = export_volumes_csv(_labels(), GEOMETRY, {1: "liver", 2: "spleen, accessory"}, tmp_path / "volumes.csv")
    rows = _rows(path)
    assert list(rows[0]) == list(VOLUMES_CSV_COLUMNS)
    by_value = {int(r["label_value"]): r for r in rows}
    assert sorted(by_value) == [1, 2, 9]
    liver = by_value[1]
    assert liver["label_name"] == "liver" and int(liver["voxel_count"]) == 24
    assert float(liver["volume_ml"]) == pytest.approx(24 * 0.5 * 2.0 * 4.0 / 1000, abs=1e-4)
    # x: index 0..3 -> 100 - 0.5 * i -> 98.5..100 ; y: -50 + 2 * (2..4) ; z: 10 + 4 * (1..2)
    mins = [float(liver[f"bbox_min_{a}_mm"]) for a in "xyz"]
    maxs = [float(liver[f"bbox_max_{a}_mm"]) for a in "xyz"]
    assert mins == pytest.approx([98.5, -46.0, 14.0]) and maxs == pytest.approx([100.0, -42.0, 18.0])
    assert by_value[2]["label_name"] == "spleen, accessory" and by_value[2]["voxel_count"] == "0"
    assert by_value[2]["bbox_min_x_mm"] == ""
    assert by_value[9]["label_name"] == "label 9"
    assert float(by_value[9]["bbox_min_x_mm"]) == pytest.approx(97.0)


def test_volumes_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="negative"):
        export_volumes_csv(-np.ones((2, 2, 2), np.int8), GEOMETRY, None, tmp_path / "v.csv")
    with pytest.raises(ExportError, match="missing"):
        export_volumes_csv(_labels(), GEOMETRY, None, tmp_path / "missing" / "v.csv")


def test_summary_json_has_no_identifiers(tmp_path: Path) -> None:
    weights = tmp_path / "private_dir_of_dr_smith" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\x00weights" * 1000)
    log = EditLog((5, 6, 7))
    log.record("paint", np.array([1, 2, 3]), labels=[1])
    log.accept_slice(0, 4)
    path = export_summary_json(
        tmp_path / "summary.json",
        ["background", "liver"],
        label_colors={1: (1.0, 0.5, 0.0), 9: (0, 0, 255)},
        labels=_labels(),
        geometry=GEOMETRY,
        model_name="lightm-unet-ct",
        model_version="1.2",
        weights_path=weights,
        edit_log=log,
    )
    text = path.read_text()
    data = json.loads(text)
    assert data["model"] == {
        "name": "lightm-unet-ct",
        "version": "1.2",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    labels = {e["value"]: e for e in data["labels"]}
    assert labels[1]["name"] == "liver" and labels[1]["color"] == "#ff8000" and labels[1]["voxel_count"] == 24
    assert labels[9]["color"] == "#0000ff" and labels[9]["volume_ml"] == pytest.approx(0.004)
    assert data["edits"]["edits_by_kind"]["paint"] == 1 and data["edits"]["reviewed_slices"]["axis0"] == [4]
    assert data["grid"]["spacing_xyz_mm"] == [0.5, 2.0, 4.0]
    assert "dr_smith" not in text and str(tmp_path) not in text


def test_summary_json_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="SHA-256"):
        export_summary_json(tmp_path / "s.json", None, weights_sha256="abc")
    with pytest.raises(ExportError, match="weights file"):
        export_summary_json(tmp_path / "s.json", None, weights_path=tmp_path / "nope.pt")
    with pytest.raises(ExportError, match="geometry"):
        export_summary_json(tmp_path / "s.json", None, labels=_labels())
    with pytest.raises(ExportError, match="colour"):
        export_summary_json(tmp_path / "s.json", None, label_colors={1: (1, 2)})
    assert not (tmp_path / "s.json").exists()


def test_edit_log_export_round_trips_and_needs_a_log(tmp_path: Path) -> None:
    """The 'edits' format writes <stem>_edits.npz, which `napari-medmamba finetune` reads back."""
    from napari_medmamba.export.all_formats import EDITS_SUFFIX, run_exports
    from napari_medmamba.io import Volume

    labels = np.zeros((4, 5, 6), np.uint8)
    source = Volume(np.zeros((4, 5, 6), np.float32), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    log = EditLog(labels.shape)
    log.accept_slice(0, 2)
    kw = dict(label_names=("background", "a"), label_colors=("#000000", "#ff0000"), model_name=None)
    written, errors = run_exports(labels, source, tmp_path, "case", ["edits"], edit_log=log, **kw)
    assert errors == [] and written == [tmp_path / f"case{EDITS_SUFFIX}"]
    assert EditLog.load(written[0]).reviewed_indices(0) == {2}
    written, errors = run_exports(labels, source, tmp_path / "none", "case", ["edits"], **kw)
    assert written == [] and len(errors) == 1 and "no edit log" in errors[0]
