"""Batch segmentation on Dask distributed: LocalCluster, joining a scheduler, worker deaths, bad cases."""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from pathlib import Path

import pytest

from napari_medmamba.cli import main
from napari_medmamba.io import read_volume

distributed = pytest.importorskip("distributed", reason="needs napari-medmamba[dask]")

from napari_medmamba.distributed import local_cluster, run_batch, segment_path  # noqa: E402

MODEL = "unet_3d"  # fast; random weights are fine for plumbing


@pytest.fixture(scope="module")
def cases(hippocampus: Path) -> list[Path]:
    return sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[:4]


def _assert_same_grid(output: str | Path, scan: Path) -> None:
    labels, image = read_volume(output), read_volume(scan)
    assert labels.shape == image.shape and labels.geometry.isclose(image.geometry)


def test_workers_2_segments_reports_bad_case_and_resumes(cases: list[Path], tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a scan")
    out = tmp_path / "out"
    inputs = [str(p) for p in cases[:3]] + [str(bad)]
    assert main(["segment", *inputs, "-o", str(out), "--model", MODEL, "--mode", "fast", "--workers", "2",
                 "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["failed"] == 1
    assert "broken" in captured.err and "(4/4)" in captured.err  # progress per finished case on stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["case"] for r in rows] == [p.name[:-7] for p in cases[:3]] + ["broken"]  # input order, once each
    assert [r["status"] for r in rows[:3]] == ["ok"] * 3 and rows[3]["status"].startswith("failed")
    for row, src in zip(rows[:3], cases):
        _assert_same_grid(row["output"], src)
        assert row["worker"].startswith("tcp://127.0.0.1:")  # bound to localhost
    assert not list(out.glob(".*tmp*"))
    # resumable: a second run skips what is done and only does the new case
    before = {p: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")}
    assert main(["segment", *map(str, cases), "-o", str(out), "--model", MODEL, "--mode", "fast",
                 "--workers", "1", "-q"]) == 0
    after = {p: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")}
    assert {p: after[p] for p in before} == before and len(after) == 4
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["skipped (exists)"] * 3 + ["ok"]


def kill_once(path, outdir, case, *args, marker_dir: str, before: tuple, after: tuple):
    """The task, except that the first attempt of some cases kills its worker process."""
    marker = Path(marker_dir) / f"{case}.attempts"
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\n")
    first = len(marker.read_text().split()) == 1  # pids and statuses, one per line
    if first and case in before:
        os._exit(1)  # dies before writing anything
    row = segment_path(path, outdir, case, *args)
    with marker.open("a") as f:
        f.write(f"{row['status'].replace(' ', '_')}\n")
    if first and case in after:
        os._exit(1)  # dies after writing the output, before reporting it
    return row


def test_killed_worker_case_is_retried_once_and_nothing_is_done_twice(cases: list[Path], tmp_path: Path) -> None:
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    names = [p.name[:-7] for p in cases]
    task = functools.partial(kill_once, marker_dir=str(markers), before=(names[0],), after=(names[2],))
    log: list[str] = []
    with local_cluster(2, device="cpu") as client:
        rows = run_batch(client, cases, out, MODEL, mode="fast", log=log.append, task=task)
        loads = client.run(lambda dask_worker: dask_worker._medmamba_model_loads)
    assert [r["case"] for r in rows] == names  # each case exactly once
    assert all(r["status"].startswith("ok") for r in rows), rows
    assert rows[2]["status"] == "ok (written by an earlier attempt)"  # reported, not recomputed
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_labels.nii.gz" for n in names)  # no temp files
    for row, src in zip(rows, cases):
        _assert_same_grid(row["output"], src)
    # Each case was segmented exactly once. A retried task (or one whose result was lost with
    # a dead worker's memory and recomputed) finds its output and reports it instead.
    segmented = {n: (markers / f"{n}.attempts").read_text().split().count("ok") for n in names}
    assert segmented == dict.fromkeys(names, 1)
    assert all(n <= 1 for n in loads.values())  # the model is loaded once per worker process


def test_join_an_existing_scheduler(cases: list[Path], tmp_path: Path, capsys) -> None:
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        assert main(["segment", str(cases[0]), "-o", str(tmp_path), "--model", MODEL, "--mode", "fast",
                     "--scheduler", cluster.scheduler_address, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["cases"]
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    _assert_same_grid(rows[0]["output"], cases[0])


def test_unreachable_scheduler_fails_cleanly(cases: list[Path], tmp_path: Path, capsys) -> None:
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(["segment", str(cases[0]), "-o", str(tmp_path), "--scheduler", "tcp://127.0.0.1:9", "-q"])
    assert code == 1 and "error: cluster" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"]])
def test_scale_options_usage_errors(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "x.nii.gz", "-o", str(tmp_path), *argv])
    assert exit_info.value.code == 2


def test_missing_distributed_says_how_to_install(monkeypatch, cases: list[Path], tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert main(["segment", str(cases[0]), "-o", str(tmp_path), "--workers", "2"]) == 2
    assert "pip install 'napari-medmamba[dask]'" in capsys.readouterr().err
