"""Batch segmentation on Dask distributed: LocalCluster, joining a scheduler, worker deaths, bad cases."""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

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


# --- per-worker thread limits and per-case diagnostics (issue #11) ------------------------------

from napari_medmamba.distributed.tasks import DIAGNOSTIC_COLUMNS  # noqa: E402
from napari_medmamba.distributed.threads import thread_counts, threads_per_worker  # noqa: E402

STAGES = ("read_s", "load_s", "segment_s", "write_s")


def test_threads_per_worker_is_a_share_of_the_cores() -> None:
    assert threads_per_worker(2, cpus=32) == 16
    assert threads_per_worker(3, cpus=32) == 10
    assert threads_per_worker(4, cpus=2) == 1  # never 0
    assert threads_per_worker(1, cpus=8) == 8


def test_thread_limit_is_applied_in_each_worker() -> None:
    # 3 differs from both defaults here: Dask's OMP_NUM_THREADS=1 (torch) and every core (SimpleITK)
    with local_cluster(2, device="cpu", threads_per_worker=3) as client:
        workers = list(client.scheduler_info()["workers"])
        futures = [client.submit(thread_counts, workers=[w], pure=False, allow_other_workers=False) for w in workers]
        counts = client.gather(futures)
    assert len(counts) == 2
    for c in counts:  # as a task sees them, in the worker's task thread
        assert c["torch_threads"] == 3 and c["sitk_threads"] == 3, c
        assert c["interop_threads"] >= 1


def test_workers_report_threads_gpu_and_stage_times(cases: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["segment", *map(str, cases[:3]), "-o", str(out), "--model", MODEL, "--mode", "fast",
                 "--workers", "2", "--threads-per-worker", "1", "--json", "-q"]) == 0
    json_rows = json.loads(capsys.readouterr().out)["cases"]
    with (out / "summary.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    # existing columns first, in their order; the diagnostics after them
    assert header[:9] == ["case", "status", "output", "shape", "spacing_mm", "model", "postprocess", "device", "seconds"]
    assert all(c.endswith("_ml") for c in header[9:-len(DIAGNOSTIC_COLUMNS)])
    assert header[-len(DIAGNOSTIC_COLUMNS):] == list(DIAGNOSTIC_COLUMNS)
    assert [r["case"] for r in json_rows] == [r["case"] for r in rows]
    for row in json_rows:
        assert row["status"] == "ok" and row["device"] == "cpu"
        assert row["worker"].startswith("tcp://127.0.0.1:") and row["worker_name"] in {"0", "1"}
        assert isinstance(row["pid"], int) and row["pid"] != os.getpid()
        assert row["gpu"] == "" and row["gpu_pci_bus_id"] == ""
        # threads the engine really used inside segment(): capped at 1 (else every physical core)
        assert row["torch_threads"] == 1 and row["sitk_threads"] == 1
        stages = [row[k] for k in STAGES]
        assert all(isinstance(s, float) and s >= 0 for s in stages), row
        assert row["segment_s"] > 0 and row["read_s"] > 0
        assert sum(stages) <= row["case_s"] + 0.05
        assert abs(row["seconds"] - (row["segment_s"] + row["write_s"])) <= 0.05 + 0.02 * row["seconds"]
        engine = [row[f"seg_{k}_s"] for k in ("preprocess", "inference", "resample", "postprocess")]
        assert all(e >= 0 for e in engine) and sum(engine) <= row["segment_s"] + 0.01
        assert 0 < row["seg_forward_s"] <= row["seg_inference_s"] + 1e-6
    assert len({r["pid"] for r in json_rows}) <= 2


def _recording_task(path, outdir, case, model, device, mode, stale, postprocess="recommended", mirror=False):
    """Stands in for segment_path: reports the clean-up and mirroring choices it was given."""
    return {"case": case, "status": "ok", "postprocess": postprocess, "mirror": mirror}


def test_postprocess_choice_reaches_each_task_and_the_summary(cases: list[Path], tmp_path: Path) -> None:
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        rows = run_batch(client, cases[:2], tmp_path / "a", MODEL, task=_recording_task)
        assert [r["postprocess"] for r in rows] == ["recommended", "recommended"]
        rows = run_batch(client, cases[:1], tmp_path / "b", MODEL, task=_recording_task, postprocess="largest")
        assert rows[0]["postprocess"] == "largest" and rows[0]["mirror"] is False
        rows = run_batch(client, cases[:1], tmp_path / "c", MODEL, task=_recording_task, mirror=True)
        assert rows[0]["mirror"] is True
    # the real task hands the choice to the CLI's segment_case (one case, in this process)
    case = cases[0].name[:-7]
    row = segment_path(str(cases[0]), str(tmp_path), case, MODEL, "cpu", "fast", None, "largest")
    assert row["status"] == "ok", row
    assert row["postprocess"] == "largest: largest component of every class"
    labels = np.rint(read_volume(row["output"]).array).astype(int)
    for value in (1, 2):  # at most one connected piece per class is left
        assert ndimage.label(labels == value, structure=np.ones((3, 3, 3)))[1] <= 1


def _load_batch_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_batch", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_per_worker_table_from_a_summary() -> None:
    bench = _load_batch_benchmark()
    gpu_a, gpu_b = "00000000:19:00.0", "00000000:3B:00.0"

    def row(worker: str, gpu: str, read: str, seg: str, write: str, status: str = "ok") -> dict[str, str]:
        return {"case": "x", "status": status, "device": "cuda:0", "worker": worker, "gpu_pci_bus_id": gpu,
                "torch_threads": "16", "sitk_threads": "16", "read_s": read, "segment_s": seg, "write_s": write}

    summary = [row("tcp://w0", gpu_a, "0.1", "0.2", "0.05"), row("tcp://w1", gpu_b, "0.3", "0.4", "0.1"),
               row("tcp://w0", gpu_a, "0.3", "0.4", "0.15"),
               {"case": "bad", "status": "failed: boom", "worker": "tcp://w1", "read_s": "", "segment_s": None}]
    stats = {s["worker"]: s for s in bench.per_worker_stats(summary)}
    assert set(stats) == {"tcp://w0", "tcp://w1"}
    w0, w1 = stats["tcp://w0"], stats["tcp://w1"]
    assert (w0["cases"], w0["ok"], w1["cases"], w1["ok"]) == (2, 2, 2, 1)
    assert w0["read_s"] == pytest.approx(0.2) and w0["segment_s"] == pytest.approx(0.3)
    assert w0["write_s"] == pytest.approx(0.1) and w1["segment_s"] == pytest.approx(0.4)
    assert w0["device"] == f"cuda:0 / {gpu_a}" and w1["device"] == f"cuda:0 / {gpu_b}" and w0["threads"] == "16/16"
    table = bench.per_worker_table(summary).splitlines()
    assert len(table) == 4 and gpu_a in table[2] and gpu_b in table[3] and "0.300" in table[2]
    # the sequential CLI's summary has no worker column: one "(main process)" line, no stage times
    sequential = bench.per_worker_stats([{"case": "x", "status": "ok", "device": "cpu", "seconds": "1.0"}])
    assert sequential == [{"worker": "(main process)", "device": "cpu", "threads": "-", "cases": 1, "ok": 1,
                           "read_s": None, "segment_s": None, "write_s": None}]
