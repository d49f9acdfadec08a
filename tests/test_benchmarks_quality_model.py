"""benchmarks/quality.py (several clean-ups from one segmentation, --weights) and benchmarks/model.py's
same-run ratio table and official-network loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_quality_scores_each_clean_up_from_the_same_segmentation(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "msd_hippocampus"
    out = tmp_path / "q.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--model", "lightm_unet_3d", "--data", str(data),
         "--split", str(ROOT / "weights" / "splits" / "msd_hippocampus.json"), "--limit", "1",
         "--weights", str(ROOT / "weights" / "lightm_unet_3d_hippocampus.safetensors"),
         "--postprocess", "none", "largest", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert set(rows) == {"none", "largest"}
    raw, cleaned = rows["none"][0], rows["largest"][0]
    assert raw["case"] == cleaned["case"] and raw["seconds"] == cleaned["seconds"]  # one segmentation
    assert raw["dice anterior hippocampus"] > 0.7
    assert "lightm_unet_3d_hippocampus.safetensors" in done.stdout and done.stdout.count("| mean foreground") == 2


def test_ratio_table_and_official_loader(tmp_path: Path) -> None:
    import model as bench

    rows = [{"case": "infer3d", "shape": [8, 8, 8], "batch": 1, "precision": "fp32", "ms": 10.0, "peak_mib": 100.0,
             "checkpointing": "off", "impl": "ours"},
            {"case": "infer3d", "shape": [8, 8, 8], "batch": 1, "precision": "fp32", "ms": 25.0, "peak_mib": 150.0,
             "checkpointing": "off", "impl": "official"}]
    table = bench.ratio_table(rows)
    ours = next(line for line in table.splitlines() if line.startswith("| ours"))
    assert "| 2.50x | 1.50x |" in ours
    good = tmp_path / "official.py"
    good.write_text("import torch\ndef build_official(spatial_dims):\n    return torch.nn.Identity()\n")
    assert type(bench.load_official_factory(good)(3)).__name__ == "Identity"
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="build_official"):
        bench.load_official_factory(bad)


def test_cuda_graph_rows_are_compared_with_the_eager_official_run() -> None:
    import model as bench

    row = {"case": "infer2d", "shape": [8, 8], "batch": 1, "precision": "bf16 autocast", "peak_mib": 100.0,
           "checkpointing": "off"}
    rows = [{**row, "ms": 30.0, "impl": "official"}, {**row, "ms": 15.0, "impl": "ours + CUDA graph"},
            {**row, "ms": 29.0, "impl": "official + CUDA graph"}]
    lines = bench.ratio_table(rows).splitlines()
    assert "| 2.00x |" in next(line for line in lines if line.startswith("| ours + CUDA graph"))
    assert next(line for line in lines if line.startswith("| official + CUDA graph")).endswith("|  |  |")
    with pytest.raises(SystemExit):  # graphs need a CUDA device: a usage error, not a crash mid-run
        bench.main(["--device", "cpu", "--cases", "infer2d", "--cuda-graphs"])


def test_scan_cpu_kernels_times_two_versions_on_the_same_inputs(capsys: pytest.CaptureFixture) -> None:
    import scan_cpu_kernels as bench

    from napari_medmamba.ssm import _cpu_numba

    bench.main(["--shapes", "1,3,300,16", "--repeats", "1", "--compare", _cpu_numba.__file__])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (1,3,300,16)")]
    assert [r.split("|")[2].strip() for r in rows] == ["compared", "current"]
    for r in rows:
        fwd, fwd_save, bwd, ratio = (float(v) for v in r.split("|")[3:7])
        assert fwd > 0 and bwd > 0 and abs(ratio - (fwd_save + bwd) / fwd) < 0.01 * ratio + 0.01


def test_cpu_forward_benchmark_compares_the_variants(tmp_path: Path) -> None:
    """benchmarks/cpu_forward.py: one row per variant, ratios to the PyTorch path, outputs that agree."""
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_forward.py"), "--cases",
                           "lightm_unet_3d:8x16x8", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["torch", "layers", "layers+heap", "pieces+heap", "pieces+heap+bf16"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["max_abs_diff_vs_torch"] == 0.0
    assert all(r["median_ms"] > 0 and r["max_abs_diff_vs_torch"] < 1e-3 for r in rows[:4])
    assert rows[4]["median_ms"] > 0 and rows[4]["max_abs_diff_vs_torch"] < 0.5  # bf16 rounding, logits of order 10
    assert "| lightm_unet_3d | 8x16x8 | pieces+heap |" in done.stdout


def test_scan_sweep_refuses_to_run_without_a_gpu(capsys: pytest.CaptureFixture) -> None:
    import scan_sweep as bench
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the sweep would run")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--shapes", "1,4,64,4", "--configs", "{}", '{"unroll_n": true}'])
    assert stop.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_kernel_profiles_cover_the_2d_network_when_a_2d_case_runs(tmp_path: Path) -> None:
    import model as bench

    out = tmp_path / "model.json"
    assert bench.main(["--device", "cpu", "--cases", "infer2d", "--size", "16", "--size2d", "16", "--warmup", "0",
                       "--repeat", "1", "--kernels", "25", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    for key in ("kernels_forward", "kernels_training_step", "kernels_2d_forward", "kernels_2d_training_step"):
        rows = got[key]
        assert 2 < len(rows) <= 25 and all(r["ms_per_call"] >= 0 and 0 <= r["share"] <= 1 for r in rows), key
        assert rows[0]["ms_per_call"] > 0 and [r["ms_per_call"] for r in rows] == sorted(
            (r["ms_per_call"] for r in rows), reverse=True), key
    # the 2D profile is of the 2D network: its scans are there (which rank they take depends on the CPU)
    assert any("Scan" in r["op"] for r in got["kernels_2d_forward"])
    assert any("Scan" in r["op"] for r in got["kernels_2d_training_step"])


def test_engine_ab_segments_each_case_with_both_checkouts(hippocampus: Path, tmp_path: Path) -> None:
    """benchmarks/engine_ab.py with this checkout as both base and head: one worker per checkout, each case
    segmented by both, the same labels, a time ratio per case."""
    import engine_ab as bench

    out = tmp_path / "ab.json"
    assert bench.main(["--base", str(ROOT), "--head", str(ROOT), "--model", "lightm_unet_3d", "--data",
                       str(hippocampus), "--split", str(ROOT / "weights" / "splits" / "msd_hippocampus.json"),
                       "--limit", "2", "--target-seconds", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["base"] == got["head"] == str(ROOT / "napari_medmamba" / "__init__.py")
    assert len(got["rows"]) == 2
    for row in got["rows"]:
        assert row["seconds base"] > 0 and row["seconds head"] > 0 and row["label agreement"] == 1.0
        assert row["ratio"] == pytest.approx(row["seconds head"] / row["seconds base"])


def test_cpu_bf16_ab_segments_each_case_both_ways(hippocampus: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/cpu_bf16_ab.py: both precisions per case, in alternating order, Dice of each and agreement;
    with bf16 products forced (any CPU computes them), the two runs may differ but must nearly agree."""
    import cpu_bf16_ab as bench

    from napari_medmamba.models import mamba

    monkeypatch.setattr(mamba, "cpu_multiplies_bf16", lambda: True)
    out = tmp_path / "ab.json"
    assert bench.main(["--model", "lightm_unet_3d", "--data", str(hippocampus), "--split",
                       str(ROOT / "weights" / "splits" / "msd_hippocampus.json"), "--limit", "2",
                       "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["native_bf16"] is True and len(got["rows"]) == 2
    for row in got["rows"]:
        assert row["seconds fp32"] > 0 and row["seconds bf16"] > 0
        assert row["label agreement"] > 0.99
        for cls in got["classes"]:
            assert abs(row[f"dice {cls} bf16"] - row[f"dice {cls} fp32"]) < 0.05
    assert mamba.CPU_BF16_ENV not in os.environ  # the script leaves the process's setting as it found it


def test_scan_host_refuses_to_run_without_a_gpu(capsys: pytest.CaptureFixture) -> None:
    import scan_host as bench
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    assert bench.main(["--backends", "triton", "--n", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_triton_registers_compiles_every_scan_kernel_for_hopper(tmp_path: Path) -> None:
    """benchmarks/triton_registers.py: the chunked scan's six launches (forward 3, backward 3) captured with the
    arguments the host code gives them, compiled for sm_90 by Triton's own specialisation, and read back."""
    pytest.importorskip("triton")
    import triton_registers as bench

    out = tmp_path / "regs.json"
    assert bench.main(["--shapes", "1,8,1000,16", "--dtypes", "fp32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["kernel"] for r in rows] == ["_chunk_state_kernel", "_chunk_combine_kernel", "_scan_out_kernel",
                                           "_bwd_tile_adjoint_kernel", "_chunk_combine_kernel", "_bwd_tile_grad_kernel"]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["sass_instructions"] > 100 and r["sass_MUFU"] > 0, r
        assert 0 < r["resident_warps_per_sm"] <= 64 and r["programs"] >= 1
    grad = rows[-1]
    assert grad["constexprs"]["T"] == 128 and grad["warps_per_program"] == 1
    assert bench.resident_warps(255, 1) == 8 and bench.resident_warps(64, 1) == 32 and bench.resident_warps(32, 4) == 64
    with pytest.raises(ValueError, match="unknown launch parameters"):
        bench.main(["--shapes", "1,8,1000,16", "--dtypes", "fp32", "--override", '{"bwd_warps": 2}'])
