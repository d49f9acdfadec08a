"""docs/notebook.ipynb runs top to bottom (nbclient, the venv's ipykernel) and prints what it promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("anywidget", reason="needs napari-medmamba[notebook]")
nbformat = pytest.importorskip("nbformat", reason="needs napari-medmamba[notebook]")
nbclient = pytest.importorskip("nbclient", reason="needs napari-medmamba[notebook]")
pytest.importorskip("ipykernel", reason="needs napari-medmamba[notebook]")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.ipynb"


def _kernel_manager():
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class _ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):  # the kernel runs in the interpreter running the tests
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="this python", language="python")

    from jupyter_client.manager import KernelManager

    return KernelManager(kernel_spec_manager=_ThisPython(), kernel_name="python3")


def test_example_notebook_executes(tmp_path, monkeypatch):
    store = tmp_path / "models"
    monkeypatch.setenv("MEDMAMBA_MODELS_DIR", str(store))  # the kernel inherits it: fine-tuned models go here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, km=_kernel_manager(), resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text, widgets = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            text.append(out.get("text", ""))
            widgets += "application/vnd.jupyter.widget-view+json" in out.get("data", {})
    text = "".join(text)
    assert widgets == 1
    assert "widget: VolumeViewer" in text
    assert "voxels changed by the stroke: " in text and "after undo, voxels changed: 0" in text
    assert "edit log: edits 1" in text
    lines = {ln.split()[0] + " " + ln.split()[1]: ln.split() for ln in text.splitlines() if "hippocampus" in ln and "(" not in ln}
    for name in ("anterior hippocampus", "posterior hippocampus"):
        voxels, ml = int(lines[name][2]), float(lines[name][3])
        assert voxels > 200 and ml == pytest.approx(voxels / 1000, abs=1e-3)  # 1 mm voxels
    assert "written: volumes.csv" in text

    # fine-tune step: 2 steps, Dice on held-back slices, saved in the store, re-segmentation keeps the confirmed voxels
    import re

    m = re.search(r"fine-tuned: (lightm_unet_3d-ft-[0-9a-f]{8}) \(2 steps, (\d+) training slices, (\d+) held back\)", text)
    assert m, text
    name, n_train, n_held = m.group(1), int(m.group(2)), int(m.group(3))
    assert n_train >= 1 and n_held >= 1 and n_train + n_held == 5
    before, after = (float(v) for v in re.search(r"held-back Dice before -> after: ([\d.]+) -> ([\d.]+)", text).groups())
    assert 0 <= before <= after <= 1  # the best state is kept
    assert f"saved to the model store: {name}.safetensors {name}.json" in text
    assert sorted(p.name for p in store.iterdir()) == [f"{name}.json", f"{name}.safetensors"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in store.iterdir())
    assert re.search(rf"re-segmented with {name} - voxels changed: \d+", text)
    assert "confirmed voxels kept: True" in text
    # stroke, undo, redo, 5 reviewed slices, and the re-segmentation when it changed anything
    changed = int(re.search(r"voxels changed: (\d+)\n", text[text.index("re-segmented"):]).group(1))
    assert f"CHECK version {8 + (changed > 0)} " in text
