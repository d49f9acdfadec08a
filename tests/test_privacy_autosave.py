"""Autosaves are private, findable and clearable (issue #14).

Autosave files are 0o600 in 0o700 folders (whatever the umask), their folder names are
hashes (no scan path, which may hold a patient's name), their headers hold no path, and
:func:`napari_medmamba.privacy.list_autosaves` / :func:`clear_autosaves` show and delete
all of them; ``AutosaveSession.clear`` deletes one.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_medmamba.annotation import LabelHistory
from napari_medmamba.annotation.autosave import AutosaveSession, default_autosave_root
from napari_medmamba.privacy import clear_autosaves, list_autosaves

pytestmark = pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX permissions")

PATIENT_SCAN = "Doe_Jane_PID-123456/ct.nii.gz"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _session(key: str, root: Path | None = None) -> AutosaveSession:
    labels = np.zeros((4, 8, 8), np.uint8)
    history = LabelHistory(labels)
    history.apply("paint", 1, region=np.s_[1:3, 2:5, 2:5])
    return AutosaveSession(key, folder=root, history=history)


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache" / "napari-medmamba" / "autosave"
    monkeypatch.setenv("MEDMAMBA_AUTOSAVE_DIR", str(root))
    return root


def test_autosave_is_owner_only_even_with_a_permissive_umask(root: Path) -> None:
    old = os.umask(0)
    try:
        path = _session(PATIENT_SCAN).save_now()
    finally:
        os.umask(old)
    assert path is not None and path.parent.parent == root == default_autosave_root()
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    # neither the folder name nor the file holds the scan path (which names the patient)
    assert "Doe" not in str(path) and "PID" not in str(path)
    data = np.load(path)
    assert not [k for k in data.files if b"Doe" in data[k].tobytes() or b"PID-123456" in data[k].tobytes()]


def test_group_readable_folder_is_tightened(root: Path) -> None:
    session = _session("scan-a")
    session.folder.mkdir(parents=True, mode=0o755)
    os.chmod(session.folder, 0o755)
    session.save_now()
    assert _mode(session.folder) == 0o700 and _mode(session.path) == 0o600


def test_list_and_clear_every_autosave(root: Path) -> None:
    assert list_autosaves() == [] and clear_autosaves() == 0  # no folder yet: nothing, no error
    paths = [_session(key).save_now() for key in ("scan-a", "scan-b", PATIENT_SCAN)]
    other = root / "notes.txt"
    other.write_text("not an autosave")
    stale = paths[0].parent / ".autosave.npz.tmp-crashed"
    stale.write_bytes(b"half written")
    assert sorted(list_autosaves()) == sorted(paths)
    assert clear_autosaves() == 3
    assert list_autosaves() == []
    assert not any(p.exists() or p.parent.exists() for p in paths) and not stale.exists()
    assert other.read_text() == "not an autosave"  # only autosaves are deleted


def test_list_and_clear_an_explicit_folder_and_one_session(tmp_path: Path, root: Path) -> None:
    mine = tmp_path / "ward-share"
    kept = _session("scan-a").save_now()
    session = _session("scan-b", mine)
    path = session.save_now()
    assert list_autosaves(mine) == [path]
    session.clear()
    assert not path.exists() and not path.parent.exists()
    assert list_autosaves(mine) == [] and list_autosaves() == [kept]


def test_clear_does_not_follow_symlinks(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "autosave.npz").write_bytes(b"someone else's file")
    root.mkdir(parents=True)
    (root / ("0" * 32)).symlink_to(outside, target_is_directory=True)
    assert list_autosaves() == []
    assert clear_autosaves() == 0
    assert (outside / "autosave.npz").exists()
