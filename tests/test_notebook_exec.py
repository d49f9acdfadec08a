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


def test_example_notebook_executes(tmp_path):
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
    assert "written: volumes.csv" in text and "CHECK version 3" in text
