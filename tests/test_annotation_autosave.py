"""Autosave: atomic owner-only files, recovery, and survival of a SIGKILL mid-session."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medmamba.annotation.autosave import (
    AUTOSAVE_ENV,
    AutosaveError,
    AutosaveSession,
    autosave_folder,
    default_autosave_root,
    find_recovery,
    read_autosave,
)
from napari_medmamba.annotation.history import LabelHistory

ROOT = Path(__file__).resolve().parents[1]


def _history(shape=(4, 5, 6)) -> LabelHistory:
    return LabelHistory(np.zeros(shape, np.uint8))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_and_restore_roundtrip_with_private_permissions(tmp_path) -> None:
    h = _history()
    h.apply("paint", 3, indices=np.array([0, 5, 7]))
    h.accept_slice(0, 2)
    session = AutosaveSession("scan-1", folder=tmp_path, history=h)
    path = session.save_now()
    assert path == session.path and path.is_file()
    assert _mode(path) == 0o600 and _mode(session.folder) == 0o700
    assert "scan-1" not in str(session.folder)  # hashed name, no scan path on disk
    assert session.save_now() is None  # unchanged: not rewritten
    expected_labels, expected_mask = h.labels.copy(), h.edit_log.edited_mask.copy()

    h.apply("erase", 0, indices=np.array([0, 5, 7]))  # later edits, not saved
    restored = AutosaveSession("scan-1", folder=tmp_path, history=h).restore()
    assert restored is not None and restored.age_s < 60
    np.testing.assert_array_equal(h.labels, expected_labels)
    np.testing.assert_array_equal(h.edit_log.edited_mask, expected_mask)
    assert h.edit_log.reviewed_indices(0) == {2} and not h.can_undo


def test_default_folder_env_override_and_beside_scan(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(AUTOSAVE_ENV, str(tmp_path / "cache"))
    assert default_autosave_root() == tmp_path / "cache"
    scan = tmp_path / "patient_scan.nii.gz"
    scan.write_bytes(b"x")
    assert autosave_folder(scan).parent == tmp_path / "cache"
    beside = autosave_folder(scan, beside_scan=True)
    assert beside == tmp_path / "patient_scan.nii.gz.medmamba"
    with pytest.raises(ValueError):
        autosave_folder(scan, folder=tmp_path, beside_scan=True)

    h = _history()
    h.apply("paint", 1, indices=np.array([1]))
    AutosaveSession(scan, beside_scan=True, history=h).save_now()
    time.sleep(0.01)
    h.apply("paint", 2, indices=np.array([2]))
    AutosaveSession(scan, history=h).save_now()  # newer, in the cache folder
    info = find_recovery(scan)
    assert info is not None and info.path.parent.parent == tmp_path / "cache"
    assert info.labels.reshape(-1)[2] == 2


def test_no_recovery_and_corrupt_file_is_kept(tmp_path) -> None:
    assert find_recovery("nothing-here", folder=tmp_path) is None
    session = AutosaveSession("scan-2", folder=tmp_path, history=_history())
    session.folder.mkdir(parents=True)
    session.path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="autosave.npz"):
        assert session.find_recovery() is None
    assert session.path.read_bytes() == b"garbage"
    with pytest.raises(AutosaveError, match="autosave.npz"):
        read_autosave(session.path)


def test_clear_and_errors(tmp_path) -> None:
    session = AutosaveSession("scan-3", folder=tmp_path, history=_history())
    session.save_now(force=True)
    session.clear()
    assert not session.path.exists() and not session.folder.exists()
    with pytest.raises(AutosaveError, match="attach"):
        AutosaveSession("scan-4", folder=tmp_path).save_now()
    with pytest.raises(ValueError):
        AutosaveSession("scan-4", folder=tmp_path, interval_s=0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AutosaveError, match="cannot write autosave"):
        AutosaveSession("scan-5", folder=blocker, history=_history()).save_now(force=True)


def test_background_timer_saves_and_stop_saves_last_state(tmp_path) -> None:
    h = _history()
    with AutosaveSession("scan-6", folder=tmp_path, interval_s=0.05, history=h) as session:
        h.apply("paint", 4, indices=np.array([3]))
        deadline = time.time() + 5
        while session.last_saved is None and time.time() < deadline:
            time.sleep(0.01)
        assert session.last_saved is not None
        h.apply("paint", 5, indices=np.array([4]))
    assert not session.running
    info = session.find_recovery()
    assert info.labels.reshape(-1)[3:5].tolist() == [4, 5] and len(info.edit_log.edits) == 2


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from napari_medmamba.annotation import AutosaveSession, LabelHistory

    folder, block = sys.argv[1], int(sys.argv[2])
    labels = np.random.default_rng(0).integers(0, 4, size=(48, 128, 128), dtype=np.uint8)
    history = LabelHistory(labels, max_entries=10)
    session = AutosaveSession("killed-scan", folder=folder, interval_s=0.5, history=history)
    session.start()
    print("ready", time.time(), flush=True)
    i = 0
    while True:
        history.apply("paint", 9, indices=np.arange(i * block, (i + 1) * block) % labels.size)
        i += 1
        print(i, time.time(), flush=True)
        time.sleep(0.005)
    """
)


@pytest.mark.parametrize("run_s", [1.37, 2.11])
def test_sigkill_mid_session_loses_at_most_one_interval(tmp_path, run_s) -> None:
    block, interval, slack = 997, 0.5, 0.6  # slack: time to write one save on a busy machine
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "saves"), str(block)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("ready"), proc.stderr.read()
        time.sleep(run_s)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    progress = [line.split() for line in out.splitlines() if line.strip()]
    done = {int(i): float(t) for i, t in progress}
    assert proc.returncode == -signal.SIGKILL and done

    info = find_recovery("killed-scan", folder=tmp_path / "saves")
    assert info is not None  # complete and readable: never a half-written file
    assert oct(_mode(info.path)) == oct(0o600)
    k = len(info.edit_log.edits)
    expected = np.random.default_rng(0).integers(0, 4, size=(48, 128, 128), dtype=np.uint8).reshape(-1)
    expected[: k * block] = 9
    np.testing.assert_array_equal(info.labels.reshape(-1), expected)  # exactly the state after k edits
    assert info.meta["history_version"] == k
    edits_before_last_interval = sum(1 for t in done.values() if t <= killed_at - interval - slack)
    assert edits_before_last_interval <= k <= max(done) + 1
