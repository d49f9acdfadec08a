"""The in-memory scan: a (z, y, x) array with its physical geometry.

Geometry follows SimpleITK: ``spacing`` and ``origin`` are (x, y, z) in millimetres in
LPS patient coordinates, ``direction`` is the row-major 3x3 matrix whose columns are the
physical directions of the x, y and z index axes. Arrays are stored (z, y, x) in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Geometry", "DicomInfo", "Volume", "scan_name"]

_SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def scan_name(path: str | Path) -> str:
    """A case name for a scan path: the file or folder name without its image extension."""
    name = Path(path).name
    for ext in _SCAN_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a 3D voxel grid, as SimpleITK defines it."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in self.direction))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 spacings, 3 origin values and 9 direction values")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive and finite, got {self.spacing}")

    @classmethod
    def from_sitk(cls, image: Any) -> "Geometry":
        """Geometry of a 3D ``SimpleITK.Image``."""
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image: Any) -> Any:
        """Set this geometry on a 3D ``SimpleITK.Image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array-axis order (z, y, x), in mm."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 direction matrix (columns: physical directions of the x, y, z index axes)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (x, y, z) indices to LPS (x, y, z) millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def zyx_affine(self) -> np.ndarray:
        """4x4 matrix mapping (z, y, x) array indices to physical (z, y, x) millimetres.

        This is the affine napari needs so that world coordinates are physical
        millimetres with the axes in the same order as the array.
        """
        rev = np.eye(4)[[2, 1, 0, 3]]
        return rev @ self.index_to_physical_matrix() @ rev

    def physical_to_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices of LPS (x, y, z) points in mm; points has shape (..., 3)."""
        m = self.direction_matrix @ np.diag(self.spacing)
        return (np.asarray(points_xyz, dtype=float) - np.asarray(self.origin)) @ np.linalg.inv(m).T

    def cropped(self, start_zyx: tuple[int, int, int]) -> "Geometry":
        """Geometry of a sub-grid whose first voxel is ``start_zyx`` of this grid."""
        start_xyz = np.asarray(start_zyx[::-1], dtype=float)
        origin = self.index_to_physical_matrix() @ np.append(start_xyz, 1.0)
        return Geometry(self.spacing, tuple(origin[:3]), self.direction)

    def isclose(self, other: "Geometry", atol: float = 1e-6) -> bool:
        """True when spacing, origin and direction agree within ``atol``."""
        return bool(
            np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )

    def to_dict(self) -> dict[str, list[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Geometry":
        return cls(tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))


@dataclass
class DicomInfo:
    """What a DICOM-SEG / RTSTRUCT export needs from the source series."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    sop_class_uid: str | None
    sop_instance_uids: list[str]
    files: list[Path]
    """Source files in array z order (slice 0 first)."""
    modality: str | None = None
    patient: dict[str, str] = field(default_factory=dict)
    """Patient module: PatientName, PatientID, PatientBirthDate, PatientSex."""
    study: dict[str, str] = field(default_factory=dict)
    """General study module: StudyDate, StudyTime, StudyID, AccessionNumber, ReferringPhysicianName."""
    series_description: str | None = None


@dataclass
class Volume:
    """A 3D scan: ``array`` is (z, y, x); ``geometry`` places it in patient space."""

    array: np.ndarray
    geometry: Geometry
    path: Path | None = None
    modality: str | None = None
    """"CT", "MR" or None when the file does not say."""
    dicom: DicomInfo | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume arrays are 3D (z, y, x); got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.geometry.spacing_zyx

    @property
    def name(self) -> str:
        """A display name: the file or folder name without extension, or "volume"."""
        return "volume" if self.path is None else scan_name(self.path)

    def crop(self, start_zyx: tuple[int, int, int], stop_zyx: tuple[int, int, int]) -> "Volume":
        """The sub-volume ``[start:stop]`` (clipped to the grid) with its exact geometry; a copy."""
        start = [max(0, int(a)) for a in start_zyx]
        stop = [min(n, int(b)) for n, b in zip(self.shape, stop_zyx)]
        if any(b <= a for a, b in zip(start, stop)):
            raise ValueError(f"crop {start_zyx}..{stop_zyx} does not overlap the grid {self.shape}")
        array = self.array[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].copy()
        return Volume(array=array, geometry=self.geometry.cropped(tuple(start)), path=self.path,
                      modality=self.modality, dicom=None)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding another array (e.g. labels)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume grid {self.shape}")
        return Volume(array=array, geometry=self.geometry, path=self.path, modality=self.modality, dicom=self.dicom)
