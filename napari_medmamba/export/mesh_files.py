"""Small writers for triangle meshes: binary STL and Wavefront OBJ (atomic)."""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path

import numpy as np

from ..atomic_write import atomic_write

__all__ = ["face_normals", "signed_volume", "write_stl", "write_obj", "read_stl"]

_STL_TRIANGLE = np.dtype(
    [("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")]
)


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals of the triangles (right-hand rule), zero for degenerate ones."""
    tri = vertices[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, length, out=np.zeros_like(n), where=length > 0)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Enclosed volume of a closed mesh (positive when the normals point outwards)."""
    tri = vertices[faces].astype(float)
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


def write_stl(path: str | PathLike[str], vertices: np.ndarray, faces: np.ndarray, header: str = "") -> Path:
    """Write a binary STL (little-endian float32, 80-byte ASCII header)."""
    data = np.zeros(len(faces), dtype=_STL_TRIANGLE)
    data["normal"] = face_normals(vertices, faces)
    data["vertices"] = vertices[faces]
    head = header.encode("ascii", "replace")[:80].ljust(80, b" ")
    count = np.array([len(faces)], dtype="<u4").tobytes()
    return atomic_write(path, head + count + data.tobytes())


def read_stl(path: str | PathLike[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """Read a binary STL written by :func:`write_stl`: (header, triangles (n, 3, 3), normals)."""
    raw = Path(path).read_bytes()
    count = int(np.frombuffer(raw, "<u4", 1, 80)[0])
    if len(raw) != 84 + count * _STL_TRIANGLE.itemsize:
        raise ValueError(f"{str(path)!r} is not a binary STL of {count} triangles")
    data = np.frombuffer(raw, _STL_TRIANGLE, count, 84)
    return raw[:80].decode("ascii").rstrip(), data["vertices"].astype(float), data["normal"].astype(float)


def write_obj(
    path: str | PathLike[str], vertices: np.ndarray, faces: np.ndarray, name: str = "mesh", comment: str = ""
) -> Path:
    """Write a Wavefront OBJ (vertices and 1-based triangle faces)."""
    out = io.BytesIO()
    for line in comment.splitlines():
        out.write(f"# {line}\n".encode())
    out.write(f"o {name}\n".encode())
    np.savetxt(out, vertices, fmt="v %.5f %.5f %.5f")
    np.savetxt(out, np.asarray(faces, dtype=np.int64) + 1, fmt="f %d %d %d")
    return atomic_write(path, out.getvalue())
