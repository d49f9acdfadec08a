"""Shared fixtures. Real data lives in ../shared/data (read-only in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDMAMBA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    """Return ``path``; fail in CI (CI=true) when it is missing, skip elsewhere."""
    if path.exists():
        return path
    message = f"shared test data missing: {path} (see ../shared/data/MANIFEST.md)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder (fails in CI, skips elsewhere, when missing)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def totalseg(shared_data: Path) -> Path:
    return _require(shared_data / "totalseg")


@pytest.fixture(scope="session")
def dicom_series(totalseg: Path) -> Path:
    """The real 20-slice CT DICOM series (512x512x20)."""
    return _require(totalseg / "example_ct_dicom")


@pytest.fixture()
def real_uid_series(dicom_series: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the DICOM series with freshly generated study and series UIDs (the shared series carries
    placeholder ones) and SOP UIDs taken from each file's meta header: (folder, study UID, series UID)."""
    import pydicom

    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    copy = tmp_path / "series"
    copy.mkdir()
    for file in sorted(dicom_series.iterdir()):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(copy / file.name)
    return copy, study, series


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    return _require(shared_data / "msd_hippocampus")


@pytest.fixture(scope="session")
def openkbp(shared_data: Path) -> Path:
    return _require(shared_data / "openkbp")


@pytest.fixture(scope="session")
def dicom_series_labels(totalseg: Path) -> Path:
    """TotalSegmentator's label map of the DICOM series (NIfTI; same voxels, y axis flipped)."""
    return _require(totalseg / "example_seg_dicom.nii.gz")


@pytest.fixture()
def network_blocked():
    """Run the test with every network call refused (napari_medmamba.privacy.no_network) and fail if any
    connection was attempted (local Unix sockets, e.g. the X server, stay allowed)."""
    from napari_medmamba.privacy import no_network

    with no_network() as guard:
        yield guard
    assert guard.attempts == [], guard.attempts
