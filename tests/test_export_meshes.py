"""Surface meshes: physical placement, closed volume, file formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_medmamba.export import ExportError, export_meshes, label_stats
from napari_medmamba.export.mesh_files import read_stl, signed_volume
from napari_medmamba.io import Geometry


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


# an oblique grid with a flipped x axis: mapping must go through spacing, direction and origin
OBLIQUE = Geometry(
    spacing=(0.8, 0.9, 1.5),
    origin=(-120.0, 40.5, 7.25),
    direction=tuple((_rotation(30) @ np.diag([-1.0, 1.0, 1.0])).ravel()),
)


def _ball(shape, centre_mm, radius_mm, geometry: Geometry) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    idx = np.stack([xx, yy, zz, np.ones(shape)], axis=-1)
    phys = idx @ geometry.index_to_physical_matrix().T
    return np.linalg.norm(phys[..., :3] - np.asarray(centre_mm), axis=-1) <= radius_mm


def _stl_volume(triangles: np.ndarray) -> float:
    return float(np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum() / 6)


def test_sphere_mesh_volume_and_bounds(tmp_path: Path) -> None:
    shape = (30, 40, 40)
    centre = (OBLIQUE.index_to_physical_matrix() @ [20, 20, 15, 1])[:3]
    labels = _ball(shape, centre, 12.0, OBLIQUE).astype(np.uint8) * 2
    labels[2:5, 2:6, 30:36] = 5  # a box elsewhere
    files = export_meshes(labels, OBLIQUE, {2: "ball", 5: "box/odd name"}, tmp_path / "meshes")
    assert [f.name for f in files] == ["2_ball.stl", "5_box_odd_name.stl"]

    header, triangles, normals = read_stl(files[0])
    assert "SPACE=LPS" in header and "units=mm" in header
    volume = _stl_volume(triangles)
    analytic = 4 / 3 * np.pi * 12.0**3
    assert volume > 0  # outward normals despite the flipped axis
    assert abs(volume - analytic) / analytic < 0.05
    # stored normals agree with the winding
    n = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    good = np.linalg.norm(n, axis=1) > 1e-6
    assert np.all(np.einsum("ij,ij->i", n[good], normals[good]) > 0)

    # mesh bounds equal the label's physical bounds (voxel centres) within one voxel
    stats = {s.value: s for s in label_stats(labels, OBLIQUE)}
    voxel = max(OBLIQUE.spacing)
    for file, value in zip(files, (2, 5), strict=True):
        tri = read_stl(file)[1].reshape(-1, 3)
        assert np.allclose(tri.min(axis=0), stats[value].bbox_min_mm, atol=voxel)
        assert np.allclose(tri.max(axis=0), stats[value].bbox_max_mm, atol=voxel)
    box = read_stl(files[1])[1]
    assert abs(_stl_volume(box) - 3 * 4 * 6 * np.prod(OBLIQUE.spacing)) < 0.25 * 3 * 4 * 6 * np.prod(OBLIQUE.spacing)


def test_obj_output_and_ras(tmp_path: Path) -> None:
    geometry = Geometry((1.0, 1.0, 2.0), (10.0, 20.0, 30.0))
    labels = np.zeros((6, 8, 8), np.uint16)
    labels[1:5, 2:6, 2:6] = 1
    (lps,) = export_meshes(labels, geometry, ["background", "organ"], tmp_path / "lps", fmt="obj")
    (ras,) = export_meshes(
        labels, geometry, ["background", "organ"], tmp_path / "ras", fmt="OBJ", coordinate_system="ras"
    )
    assert lps.name == "1_organ.obj"

    def parse(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
        lines = path.read_text().splitlines()
        v = np.array([[float(x) for x in ln.split()[1:]] for ln in lines if ln.startswith("v ")])
        f = np.array([[int(x) - 1 for x in ln.split()[1:]] for ln in lines if ln.startswith("f ")])
        return lines[0], v, f

    head, v, f = parse(lps)
    assert "SPACE=LPS" in head and f.min() == 0 and f.max() == len(v) - 1
    assert abs(signed_volume(v, f) - 4 * 4 * 4 * 2.0) < 0.25 * 128
    assert np.allclose(v.min(axis=0), [12, 22, 32], atol=1.0) and np.allclose(v.max(axis=0), [15, 25, 38], atol=2.0)
    head_r, v_r, f_r = parse(ras)
    assert "SPACE=RAS" in head_r
    np.testing.assert_allclose(v_r, v * [-1, -1, 1])
    assert signed_volume(v_r, f_r) > 0


def test_mesh_errors(tmp_path: Path) -> None:
    labels = np.ones((3, 3, 3), np.uint8)
    geometry = Geometry((1, 1, 1), (0, 0, 0))
    with pytest.raises(ExportError, match="mesh format"):
        export_meshes(labels, geometry, None, tmp_path, fmt="ply")
    with pytest.raises(ExportError, match="coordinate system"):
        export_meshes(labels, geometry, None, tmp_path, coordinate_system="XYZ")
    with pytest.raises(ExportError, match="integers"):
        export_meshes(labels.astype(float), geometry, None, tmp_path)
    assert export_meshes(np.zeros((3, 3, 3), np.uint8), geometry, None, tmp_path / "none") == []
