"""A real browser: JupyterLab + headless Chromium run docs/notebook.ipynb, show the viewer, paint with the mouse.

Needs /usr/bin/chromium (Debian's package; .ci/run installs it), playwright (python package only)
and jupyterlab. Set MEDMAMBA_SCREENSHOTS=1 to write docs/images/notebook_widget.png.
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


@pytest.fixture()
def jupyterlab(tmp_path):
    pytest.importorskip("jupyterlab", reason="browser test needs jupyterlab")
    pytest.importorskip("anywidget", reason="needs napari-medmamba[notebook]")
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
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--allow-root", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
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
                    pytest.fail("jupyterlab exited:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        else:
            pytest.fail("jupyterlab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
        yield f"{base}/lab/tree/notebook.ipynb?token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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


def test_notebook_in_jupyterlab_paint_with_mouse(jupyterlab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs playwright (python package)")
    t0 = time.time()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(jupyterlab)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            if page.get_by_role("button", name="No").count():
                page.get_by_role("button", name="No").first.click()
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            try:
                ready = page.wait_for_selector(".mm-viewer[data-ready='1'] canvas.mm-canvas-0", timeout=90_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise AssertionError("no viewer canvas; page outputs: "
                                     + repr(page.locator(".jp-OutputArea-output").all_inner_texts())[-2000:]
                                     + f"; screenshot {tmp_path / 'failure.png'}")
            before = _check_line(page)
            assert before[0] == 3  # stroke, undo, redo from the notebook itself
            viewer = page.locator(".mm-viewer").first
            viewer.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            shot = ROOT / "docs" / "images" / "notebook_widget.png" if os.environ.get("MEDMAMBA_SCREENSHOTS") == "1" \
                else tmp_path / "notebook_widget.png"
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
            page.wait_for_function("document.querySelector('.mm-status').textContent.includes('edits: 4')", timeout=30_000)
            if os.environ.get("MEDMAMBA_SCREENSHOTS") == "1":
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
            assert after[0] == 4, (before, after)
            assert after[2] > before[2], (before, after)  # label 2 grew in widget.labels (numpy, in the kernel)
        finally:
            browser.close()
    print(f"browser test: {time.time() - t0:.1f} s, CHECK before {before} after {after}")
