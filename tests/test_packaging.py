"""The wheel ships a real napari.yaml and the weights, and npe2 finds the plugin from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_PATTERNS = ("*.safetensors", "*.json", "*.md")
PROBE = "_packaging_probe.json"


def _copy_source(dest: Path) -> Path:
    """Copy what the build needs (symlinks kept as links) so the repo gets no build/ folder."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("napari_medmamba", "weights"):
        shutil.copytree(ROOT / name, dest / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "napari.yaml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    (dest / "weights" / PROBE).write_text('{"probe": true}\n')  # proves the weights rule works
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build")
    pytest.importorskip("setuptools")  # in the [test] extra; recent venvs do not ship it
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_source(work / "src")
    assert (src / "napari_medmamba" / "napari.yaml").is_symlink()  # the case this test is about
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    command = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check"]
    result = subprocess.run(
        [*command, "--outdir", str(work / "dist"), str(src)], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (whl,) = (work / "dist").glob("napari_medmamba-*.whl")
    return whl


def test_wheel_contains_real_manifest_and_weights(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = zf.getinfo("napari_medmamba/napari.yaml")
        assert (info.external_attr >> 16) & 0o170000 != 0o120000, "napari.yaml is stored as a symlink"
        assert zf.read(info) == (ROOT / "napari.yaml").read_bytes()
        assert zf.read(f"napari_medmamba/weights/{PROBE}") == b'{"probe": true}\n'
        shipped = [p for pattern in WEIGHT_PATTERNS for p in (ROOT / "weights").glob(pattern)]
        for path in shipped:
            assert zf.read(f"napari_medmamba/weights/{path.name}") == path.read_bytes(), path.name
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    assert "[napari.manifest]" in text and "napari-medmamba = napari_medmamba:napari.yaml" in text
    assert "napari_medmamba/_napari/_reader.py" in names


def test_npe2_finds_plugin_in_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    script = textwrap.dedent(
        """
        import importlib, importlib.metadata as md, json, sys
        from pathlib import Path
        import npe2
        target = Path(sys.argv[1]).resolve()
        (dist,) = [d for d in md.distributions(path=[str(target)]) if d.metadata["Name"] == "napari-medmamba"]
        (ep,) = [e for e in dist.entry_points if e.group == "napari.manifest"]
        manifest = npe2.PluginManifest.from_distribution("napari-medmamba")
        modules = {}
        for command in manifest.contributions.commands:
            module = importlib.import_module(command.python_name.partition(":")[0])
            modules[command.python_name] = str(Path(module.__file__).resolve())
        print(json.dumps({"ep": ep.value, "name": manifest.name, "dist": str(Path(dist._path).resolve()),
                          "first_dist": str(Path(md.distribution("napari-medmamba")._path).resolve()),
                          "modules": modules}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["ep"] == "napari_medmamba:napari.yaml"
    assert report["name"] == "napari-medmamba"
    root = str(target.resolve())
    assert report["dist"].startswith(root) and report["first_dist"] == report["dist"]
    assert report["modules"] and all(path.startswith(root) for path in report["modules"].values()), report


def test_editable_install_is_discovered() -> None:
    manager = npe2.PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("napari-medmamba")
    assert manifest.display_name == "MedMamba"
    assert manifest.contributions.readers and manifest.contributions.writers
