"""Importing the plugin inside a running napari viewer makes later triton imports safe (no segfault).

Under Mesa's OpenGL (Xvfb here), importing triton after the canvas exists crashes the process; torch does
that on its own when an optimiser is built (fine-tuning). Runs in a subprocess: the failure is a crash.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("napari")

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((4, 16, 16)))
    QApplication.processEvents()
    assert "triton" not in sys.modules
    if "--plugin" in sys.argv:
        import napari_medmamba._napari  # what opening any of our widgets, readers or samples does
    import torch
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # makes torch import triton
    print("ok", "triton" in sys.modules)
""")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (run under xvfb-run)")
def test_plugin_import_makes_triton_safe_after_the_canvas() -> None:
    done = _run("--plugin")
    assert done.returncode == 0 and "ok True" in done.stdout, done.stderr[-3000:]
