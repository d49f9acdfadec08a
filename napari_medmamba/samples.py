"""Offline sample scans shipped by installed packages (Qt-free, no downloads).

The only sample today is the MNI ICBM152 2009a nonlinear symmetric T1 template that
nilearn ships inside its wheel (see docs/samples.md for origin and copyright notice).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import Volume, read_volume

__all__ = ["SampleInfo", "ct_hint", "list_samples", "sample_path", "load_sample"]


@dataclass(frozen=True)
class SampleInfo:
    """Where a sample scan lives inside an installed package."""

    name: str
    package: str
    relative_path: str
    modality: str
    description: str
    crop_center_lps_mm: tuple[float, float, float] | None = None
    """When set, the sample is a box of ``crop_size_mm`` around this LPS point (x, y, z) in mm."""
    crop_size_mm: tuple[float, float, float] | None = None


_SAMPLES: dict[str, SampleInfo] = {
    "mni152_t1": SampleInfo(
        name="mni152_t1",
        package="nilearn",
        relative_path="datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        modality="MR",
        description="MNI ICBM152 2009a nonlinear symmetric T1 template (skull-stripped, 1 mm), shipped by nilearn",
    ),
    "mni152_t1_right_hippocampus": SampleInfo(
        name="mni152_t1_right_hippocampus",
        package="nilearn",
        relative_path="datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        modality="MR",
        description="36 x 52 x 36 mm box of the MNI152 T1 template around the right hippocampus "
                    "(MNI x=+28, y=-22, z=-14 mm), the field of view the hippocampus model is trained on",
        # MNI (RAS) (+28, -22, -14) mm is LPS (-28, +22, -14) mm.
        crop_center_lps_mm=(-28.0, 22.0, -14.0),
        crop_size_mm=(36.0, 52.0, 36.0),
    ),
}


def ct_hint() -> str:
    """One line on running the CT model on one's own scan: no head-and-neck CT can ship offline."""
    from .models.zoo import DEFAULT_CT_MODEL

    return (f"No head-and-neck CT ships with napari-medmamba (licences): open your own CT (NIfTI, NRRD, MHA or a "
            f"DICOM folder) and segment it with {DEFAULT_CT_MODEL} (napari: File > Open, then Segment; command line: "
            f"napari-medmamba segment YOUR_CT -o OUT --model {DEFAULT_CT_MODEL}).")


def list_samples() -> list[str]:
    """Names accepted by :func:`load_sample`."""
    return sorted(_SAMPLES)


def sample_path(name: str = "mni152_t1") -> Path:
    """Path of a sample file inside its installed package (the package is not imported)."""
    try:
        info = _SAMPLES[name]
    except KeyError:
        raise KeyError(f"unknown sample {name!r}; available: {', '.join(list_samples())}") from None
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"sample {name!r} is shipped by the {info.package!r} package, which is not installed "
            f"(pip install {info.package})"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / info.relative_path
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"sample {name!r} not found in the installed {info.package!r} package "
        f"(looked for {info.relative_path}); this {info.package} version may not ship it"
    )


def load_sample(name: str = "mni152_t1") -> Volume:
    """Read a sample scan as a :class:`~napari_medmamba.io.Volume` with its geometry."""
    info = _SAMPLES.get(name)
    volume = read_volume(sample_path(name))
    if volume.modality is None:
        volume.modality = info.modality
    if info.crop_center_lps_mm is not None and info.crop_size_mm is not None:
        volume = _crop_around(volume, info.crop_center_lps_mm, info.crop_size_mm)
    return volume


def _crop_around(volume: Volume, center_lps: tuple[float, float, float], size_mm: tuple[float, float, float]) -> Volume:
    """The axis-aligned index box covering ``size_mm`` (x, y, z) around an LPS point."""
    half = np.asarray(size_mm) / 2.0
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half + center_lps
    idx_xyz = volume.geometry.physical_to_index(corners)
    start_xyz = np.floor(idx_xyz.min(axis=0)).astype(int)
    stop_xyz = np.ceil(idx_xyz.max(axis=0)).astype(int)
    return volume.crop(tuple(start_xyz[::-1]), tuple(stop_xyz[::-1]))
