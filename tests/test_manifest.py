"""The npe2 manifest is valid and every command resolves to a callable."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"


@pytest.fixture(scope="module")
def manifest() -> npe2.PluginManifest:
    return npe2.PluginManifest.from_file(MANIFEST)


def test_npe2_validate_installed_plugin() -> None:
    """`npe2 validate napari-medmamba` (the installed entry point) passes."""
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-medmamba"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


def test_manifest_identity_and_contributions(manifest: npe2.PluginManifest) -> None:
    assert manifest.name == "napari-medmamba"
    assert manifest.display_name == "MedMamba"
    contributions = manifest.contributions
    (reader,) = contributions.readers
    assert reader.accepts_directories
    for pattern in ("*.nii", "*.nii.gz", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm"):
        assert pattern in reader.filename_patterns
    (writer,) = contributions.writers
    assert [t.value if hasattr(t, "value") else str(t) for t in writer.layer_types] == ["labels"]
    assert set(writer.filename_extensions) == {".nii.gz", ".nii", ".nrrd", ".mha"}
    from napari_medmamba.samples import list_samples

    assert [s.key for s in contributions.sample_data] == [*list_samples(), "ct_open_your_own"]  # + the CT how-to entry


def test_every_python_name_is_callable(manifest: npe2.PluginManifest) -> None:
    commands = manifest.contributions.commands
    assert commands
    for command in commands:
        module_name, _, attribute = command.python_name.partition(":")
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        assert callable(target), command.python_name


def test_every_contribution_points_at_a_declared_command(manifest: npe2.PluginManifest) -> None:
    ids = {c.id for c in manifest.contributions.commands}
    contributions = manifest.contributions
    referenced = [r.command for r in contributions.readers] + [w.command for w in contributions.writers]
    referenced += [s.command for s in contributions.sample_data]
    assert referenced and set(referenced) <= ids


def test_installed_manifest_is_this_file() -> None:
    """The package's napari.yaml (symlink in the source tree) is the top-level one."""
    import napari_medmamba

    packaged = Path(napari_medmamba.__file__).parent / "napari.yaml"
    assert packaged.read_text() == MANIFEST.read_text()


def test_npe2_routes_scans_dicom_and_folders_to_us(tmp_path: Path) -> None:
    """The filename patterns send scans, UID-named DICOM files and folders to this reader."""
    manager = npe2.PluginManager.instance()
    manager.discover()

    def ours(path: Path) -> bool:
        return any(r.plugin_name == "napari-medmamba" for r in manager.iter_compatible_readers([str(path)]))

    for name in ("ct.nii.gz", "CT.NII", "mr.nrrd", "x.nhdr", "x.mha", "x.mhd", "slice.dcm", "CT.1.3.12.2.1107.573"):
        assert ours(tmp_path / name), name
    assert ours(tmp_path)  # folders: the reader looks inside
    for name in ("photo.png", "table.csv", "stack.tif", "README"):
        assert not ours(tmp_path / name), name
