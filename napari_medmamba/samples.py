"""Offline sample scans shipped by installed packages (Qt-free, no downloads).

The only sample today is the MNI ICBM152 2009a nonlinear symmetric T1 template that
nilearn ships inside its wheel (see docs/samples.md for origin and copyright notice).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .io import Volume, read_volume

__all__ = ["SampleInfo", "list_samples", "sample_path", "load_sample"]


@dataclass(frozen=True)
class SampleInfo:
    """Where a sample scan lives inside an installed package."""

    name: str
    package: str
    relative_path: str
    modality: str
    description: str


_SAMPLES: dict[str, SampleInfo] = {
    "mni152_t1": SampleInfo(
        name="mni152_t1",
        package="nilearn",
        relative_path="datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        modality="MR",
        description="MNI ICBM152 2009a nonlinear symmetric T1 template (skull-stripped, 1 mm), shipped by nilearn",
    ),
}


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
    volume = read_volume(sample_path(name))
    if volume.modality is None:
        volume.modality = _SAMPLES[name].modality
    return volume
