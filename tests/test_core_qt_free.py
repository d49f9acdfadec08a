"""The core library imports without napari, Qt, magicgui or the optional GPU packages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import importlib, importlib.util, json, pkgutil, sys

    GUI = {"napari", "napari_builtins", "napari_plugin_engine", "npe2", "vispy", "qtpy", "PyQt5", "PyQt6",
           "PySide2", "PySide6", "superqt", "magicgui", "app_model", "pytestqt"}
    OPTIONAL = {"triton", "mamba_ssm", "causal_conv1d"}
    BLOCKED = GUI | OPTIONAL

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    _find_spec = importlib.util.find_spec

    def find_spec(name, package=None):  # a missing package gives None, as when not installed
        if name.partition(".")[0] in BLOCKED:
            return None
        return _find_spec(name, package)

    importlib.util.find_spec = find_spec
    for name in BLOCKED:
        assert name not in sys.modules, name
    try:
        import qtpy  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    import napari_medmamba

    imported, failed, needs_optional = [], {}, {}

    def walk(package):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name.rpartition(".")[2] == "_napari":
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as error:
                # Kernel modules inside a package named after their optional dependency
                # (ssm/triton/forward.py needs triton) may need it; nothing else may, and
                # that package itself (ssm/triton/__init__.py) must import without it.
                dep = (error.name or "").partition(".")[0]
                if dep in OPTIONAL and f".{dep}." in info.name.rpartition(".")[0] + ".":
                    needs_optional[info.name] = dep
                else:
                    failed[info.name] = f"{type(error).__name__}: {error}"
                continue
            except Exception as error:  # report every failure, not just the first
                failed[info.name] = f"{type(error).__name__}: {error}"
                continue
            imported.append(info.name)
            if info.ispkg:
                walk(module)

    walk(napari_medmamba)
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({"imported": imported, "failed": failed, "leaked": leaked, "needs_optional": needs_optional}))
    """
)


def test_core_imports_without_gui_or_optional_gpu_packages() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, json.dumps(report["failed"], indent=1)
    assert report["leaked"] == []
    imported = set(report["imported"])
    for core in ("io", "ssm", "models", "inference", "training", "annotation"):
        assert f"napari_medmamba.{core}" in imported
    assert "napari_medmamba.samples" in imported
    for module in report["needs_optional"]:  # its package must import without the dependency
        assert module.rpartition(".")[0] in imported, module
    assert not any("._napari" in name for name in imported)


@pytest.mark.parametrize("blocked", ["napari", "magicgui", "PyQt6"])
def test_blocker_really_blocks(blocked: str) -> None:
    """Guard against a blocker that silently lets GUI imports through."""
    code = SCRIPT.split("import napari_medmamba")[0] + f"\nimport {blocked}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "blocked for this test" in result.stderr
