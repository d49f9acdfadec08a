"""A real browser: JupyterLab or Jupyter Notebook 7 + headless Chromium run docs/notebook.ipynb, show the viewer,
paint with the mouse.

Needs /usr/bin/chromium (Debian's package; .ci/run installs it), playwright (python package only)
and jupyterlab; the Notebook 7 variant also needs ``notebook>=7`` (skipped without it).
Set MEDMAMBA_SCREENSHOTS=1 to write docs/images/notebook_widget.png (from the JupyterLab run).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import json
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "notebook.ipynb"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="browser test: /usr/bin/chromium missing (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FRONTENDS = {
    # name: (python -m module, extra server options, notebook URL path)
    "jupyterlab": ("jupyterlab", ["--LabApp.news_url=", "--LabApp.extension_manager=readonly",
                                  "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                   "/lab/tree/notebook.ipynb"),
    "notebook7": ("notebook", [], "/notebooks/notebook.ipynb"),
}


def _require_frontend(name: str) -> None:
    pytest.importorskip("jupyterlab", reason="browser test needs jupyterlab")
    if name == "notebook7":
        notebook = pytest.importorskip("notebook", reason="Notebook 7 browser test needs `pip install notebook`")
        if int(str(notebook.__version__).split(".")[0]) < 7:
            pytest.skip(f"Notebook 7 browser test needs notebook>=7, found {notebook.__version__}")


@pytest.fixture(params=sorted(FRONTENDS))
def jupyter(request, tmp_path):
    """(name, URL of docs/notebook.ipynb opened in that front-end, server base URL, token)."""
    name = request.param
    _require_frontend(name)
    pytest.importorskip("anywidget", reason="needs napari-medmamba[notebook]")
    module, options, path = FRONTENDS[name]
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / "notebook.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for var, sub in (("JUPYTER_CONFIG_DIR", "cfg"), ("JUPYTER_RUNTIME_DIR", "run"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "ws")):
        env[var] = str(tmp_path / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["MEDMAMBA_MODELS_DIR"] = str(tmp_path / "models")  # the notebook's fine-tuned model goes here
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--allow-root", *options],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
                break
            except Exception:
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        else:
            pytest.fail(f"{name} did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
        yield name, f"{base}{path}?token={token}", base, token
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _kernel_idle(base: str, token: str, timeout_s: float = 60) -> None:
    """Wait until the notebook's kernel runs and is idle (asked from the server: works for every front-end)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=2) as r:
                sessions = json.load(r)
            if sessions and all(s.get("kernel", {}).get("execution_state") == "idle" for s in sessions):
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise AssertionError("the notebook's kernel did not become idle")


DIALOGS: list[str] = []


def _dismiss_dialogs(page, wait_ms: int = 3000) -> list[str]:
    """Close start-up dialogs (JupyterLab's news question, a Notebook 7 notice ...): 'No' when offered,
    else the dialog's default button. Returns their texts."""
    seen = []
    deadline = time.time() + wait_ms / 1000
    while time.time() < deadline:
        dialog = page.locator(".jp-Dialog")
        if not dialog.count():
            page.wait_for_timeout(250)
            continue
        seen.append(dialog.first.inner_text()[:300])
        no = dialog.first.get_by_role("button", name="No")
        (no.first if no.count() else dialog.first.locator("button.jp-mod-accept").first).click()
        page.wait_for_timeout(300)
    return seen


def _check_line(page, timeout_s=120):
    """The last 'CHECK version N label1 A label2 B' the page shows, waiting until one appears."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = page.locator(".jp-OutputArea-output").all_inner_texts()
        hits = [m for t in text for m in re.findall(r"CHECK version (\d+) label1 (\d+) label2 (\d+)", t)]
        if hits:
            return tuple(int(v) for v in hits[-1])
        page.wait_for_timeout(250)
    raise AssertionError("no CHECK line in the page")


def test_notebook_in_browser_paint_with_mouse(jupyter, tmp_path):
    name, url, base, token = jupyter
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs playwright (python package)")
    t0 = time.time()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            _kernel_idle(base, token)
            page.wait_for_timeout(1000)
            DIALOGS.extend(_dismiss_dialogs(page))
            for attempt in range(3):  # a dialog may pop up late and catch the click: close it and retry
                try:
                    page.get_by_role("menuitem", name="Run", exact=True).click(timeout=10_000)
                    page.get_by_text("Run All Cells", exact=True).click(timeout=10_000)
                    break
                except Exception:
                    if attempt == 2:
                        raise
                    page.keyboard.press("Escape")
                    DIALOGS.extend(_dismiss_dialogs(page, 1000))
            try:
                ready = page.wait_for_selector(".mm-viewer[data-ready='1'] canvas.mm-canvas-0", timeout=90_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise AssertionError("no viewer canvas; page outputs: "
                                     + repr(page.locator(".jp-OutputArea-output").all_inner_texts())[-2000:]
                                     + f"; screenshot {tmp_path / 'failure.png'}")
            before = _check_line(page, timeout_s=300)  # the notebook fine-tunes a model on the way (CPU)
            # stroke, undo, redo, 5 reviewed slices, and the fine-tuned model's re-segmentation (if it changed any)
            assert before[0] in (8, 9), before
            assert "confirmed voxels kept: True" in "".join(page.locator(".jp-OutputArea-output").all_inner_texts())
            viewer = page.locator(".mm-viewer").first
            viewer.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            refresh = os.environ.get("MEDMAMBA_SCREENSHOTS") == "1" and name == "jupyterlab"
            shot = ROOT / "docs" / "images" / "notebook_widget.png" if refresh else tmp_path / "notebook_widget.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(path=str(shot))
            assert shot.stat().st_size > 5000

            # paint label 2 with the brush: a stroke across the middle of the axial canvas
            viewer.locator("select.mm-tool").select_option("brush")
            viewer.locator("select.mm-label").select_option("2")
            page.wait_for_timeout(300)
            box = ready.bounding_box()
            y = box["y"] + box["height"] * 0.2
            page.mouse.move(box["x"] + box["width"] * 0.2, y)
            page.mouse.down()
            for i in range(1, 11):
                page.mouse.move(box["x"] + box["width"] * (0.2 + 0.06 * i), y)
                page.wait_for_timeout(20)
            page.mouse.up()
            page.wait_for_function(f"document.querySelector('.mm-status').textContent.includes('edits: {before[0] + 1}')",
                                   timeout=30_000)
            if refresh:
                viewer.screenshot(path=str(ROOT / "docs" / "images" / "notebook_widget_painted.png"))

            # re-run the CHECK cell (the last one) and read what the kernel's labels hold now
            last = page.locator(".jp-Notebook .jp-Cell").last
            last.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            deadline = time.time() + 60
            after = before
            while after[0] == before[0] and time.time() < deadline:
                after = _check_line(page)
                page.wait_for_timeout(250)
            assert after[0] == before[0] + 1, (before, after)
            assert after[2] > before[2], (before, after)  # label 2 grew in widget.labels (numpy, in the kernel)
        finally:
            browser.close()
    print(f"browser test ({name}): {time.time() - t0:.1f} s, CHECK before {before} after {after}; dialogs {DIALOGS}")
