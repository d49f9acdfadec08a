"""No network at run time (issue #14).

The whole flow available today (read a DICOM series, segment it with the default model,
correct with undo, autosave, export every format, and the ``demo`` command on the
bundled sample) runs inside :func:`napari_medmamba.privacy.no_network`, which makes every
host-name lookup and socket connection fail and counts the attempts: there must be none.
A source scan checks that no module imports a network library or holds a URL.
"""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import numpy as np
import pytest

import napari_medmamba
from napari_medmamba.privacy import NetworkBlockedError, no_network

PACKAGE = Path(napari_medmamba.__file__).resolve().parent

NETWORK_MODULES = {
    "socket", "ssl", "urllib", "urllib2", "urllib3", "http", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
    "telnetlib", "xmlrpc", "websocket", "websockets", "pooch", "huggingface_hub", "webbrowser", "grpc",
    "paramiko", "boto3", "botocore", "sentry_sdk", "posthog", "segment", "mixpanel", "distributed",
}
"""Top-level modules that talk to the network (or open a browser)."""

ALLOWED = {"privacy.py": {"socket"}}
"""Module (path relative to the package) -> network modules it may import; privacy.py patches socket."""


def _is_dask_runner(relative: str) -> bool:
    """The opt-in Dask runner (``--workers``/``--scheduler``) is networked by design (see docs/privacy.md)."""
    return relative.startswith("distributed/") or "dask" in relative.lower()


def test_guard_blocks_and_counts_every_kind_of_attempt() -> None:
    with no_network() as guard:
        with pytest.raises(NetworkBlockedError):
            socket.getaddrinfo("example.org", 443)
        with pytest.raises(NetworkBlockedError):
            socket.create_connection(("192.0.2.1", 80), timeout=0.1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlockedError):
            s.connect(("192.0.2.1", 80))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(NetworkBlockedError):
            s.sendto(b"x", ("192.0.2.1", 53))
        import urllib.request

        with pytest.raises(OSError, match="blocked by napari_medmamba.privacy.no_network"):
            urllib.request.urlopen("http://192.0.2.1/", timeout=0.1)  # urllib wraps it in URLError
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlockedError):
            s.bind(("0.0.0.0", 0))  # every interface: refused
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))  # loopback only (urllib3's IPv6 probe does this): allowed, not counted
            with pytest.raises(NetworkBlockedError):
                s.connect(("127.0.0.1", 9))  # but connecting, even locally, is refused
    assert len(guard.attempts) == 7
    assert socket.socket.connect.__qualname__ != "no_network.<locals>.method.<locals>.guarded"  # restored


def test_whole_flow_makes_no_network_attempt(dicom_series: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("highdicom")
    monkeypatch.setenv("MEDMAMBA_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    out = tmp_path / "out"
    out.mkdir()
    with no_network() as guard:
        from napari_medmamba.annotation import LabelHistory
        from napari_medmamba.annotation.autosave import AutosaveSession
        from napari_medmamba.export import (export_dicom_seg, export_meshes, export_summary_json,
                                            export_volumes_csv, write_labels)
        from napari_medmamba.inference import segment
        from napari_medmamba.io import read_volume
        from napari_medmamba.models import default_model_name, get_model_spec
        from napari_medmamba.models.shipped import weights_path

        ct = read_volume(dicom_series)
        crop = ct.crop((0, 224, 224), (20, 288, 288))  # 20 x 64 x 64: keeps the CPU run short
        name = default_model_name()
        assert name == "lightm_unet_3d"
        result = segment(crop, name, device="cpu", mode="fast", return_probabilities=False)
        labels = np.zeros(ct.shape, np.uint8)
        labels[:, 224:288, 224:288] = result.labels.array
        history = LabelHistory(labels)
        history.apply("paint", 1, region=np.s_[4:10, 100:160, 100:160])
        history.apply("paint", 2, region=np.s_[8:14, 300:340, 200:260])
        history.apply("erase", 0, region=np.s_[5:6, 110:120, 110:120])
        assert history.undo() is not None
        names = dict(enumerate(result.label_names))
        names.pop(0)
        colors = {i: tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for i, c in enumerate(result.label_colors) if i}

        session = AutosaveSession(dicom_series, history=history)
        assert session.save_now() is not None

        written = [write_labels(labels, ct, out / f"labels{ext}")
                   for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")]
        written.append(export_volumes_csv(labels, ct.geometry, names, out / "volumes.csv"))
        written += export_meshes(labels, ct.geometry, names, out / "meshes", "stl")
        written += export_meshes(labels, ct.geometry, names, out / "meshes", "obj")
        written.append(export_summary_json(out / "summary.json", names, label_colors=colors, labels=labels,
                                           geometry=ct.geometry, model_name=name,
                                           weights_path=weights_path(get_model_spec(name)),
                                           edit_log=history.edit_log))
        written.append(export_dicom_seg(labels, ct, names, colors, out / "seg.dcm", edit_log=history.edit_log))
        written.append(export_dicom_seg(labels, ct, names, colors, out / "seg_anon.dcm", deidentify=True))
        from napari_medmamba.export import export_rtstruct

        written.append(export_rtstruct(labels, ct, out / "rt.dcm", names, colors, edit_log=history.edit_log))
        written.append(history.edit_log.save(out / "edits.npz"))
        session.clear()

        # fine-tune on the corrected crop, save to the model store, use the new model by name
        from napari_medmamba.annotation.edit_log import EditLog
        from napari_medmamba.training.finetune import CorrectionExample, finetune
        from napari_medmamba.training.model_store import clear_finetuned, list_finetuned

        crop_labels = labels[:, 224:288, 224:288].astype(np.int64)
        crop_labels[6:9, 20:30, 20:30] = 1  # a correction
        log = EditLog(crop.shape)
        for z in (4, 7, 10, 13):
            log.accept_slice(0, z)
        store = tmp_path / "models"
        ft = finetune(name, [CorrectionExample(crop, crop_labels, log)], max_steps=2, device="cpu",
                      patch_size=(8, 32, 32), out_dir=store, name="ct-crop-ft")
        again = segment(crop, (ft.model, ft.spec.contract, ft.spec.name), device="cpu", mode="fast",
                        return_probabilities=False)
        assert again.labels.shape == crop.shape
        assert [m.name for m in list_finetuned(store)] == ["ct-crop-ft"] and clear_finetuned(store) == 1
    assert guard.attempts == [], guard.attempts
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert len(written) >= 6 + 1 + 4 + 1 + 2 + 2
    assert not session.path.exists()


def test_demo_command_makes_no_network_attempt(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")
    from napari_medmamba.cli import main

    with no_network() as guard:
        assert main(["demo", "--output", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    assert guard.attempts == [], guard.attempts
    assert (tmp_path / "demo" / "summary.csv").is_file()


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value.split(".")[0])
    return found


def _urls(tree: ast.AST) -> list[str]:
    """URL-like string constants outside docstrings (a documentation link is not a network call)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and any(scheme in node.value for scheme in ("http://", "https://", "ftp://", "ws://", "wss://"))]


def test_package_source_has_no_network_code_or_urls() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 30
    problems = []
    for path in sources:
        relative = path.relative_to(PACKAGE).as_posix()
        if _is_dask_runner(relative):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bad = (_imports(tree) & NETWORK_MODULES) - ALLOWED.get(relative, set())
        if bad:
            problems.append(f"{relative} imports {sorted(bad)}")
        urls = _urls(tree)
        if urls:
            problems.append(f"{relative} holds URLs {urls}")
    assert not problems, "\n".join(problems)
