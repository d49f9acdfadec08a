"""RTSTRUCT export on the real CT series with TotalSegmentator's organs, read back with pydicom."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_medmamba.cli import main
from napari_medmamba.export import (
    DicomSourceError,
    ExportError,
    RtStructWarning,
    derived_source_uids,
    export_rtstruct,
    rtstruct_roi_names,
    rtstruct_to_labels,
)
from napari_medmamba.export.rtstruct import RTSTRUCT_SOP_CLASS_UID, slice_contours
from napari_medmamba.io import Geometry, Volume, read_volume, write_labels

ORGANS = {1: "spleen", 5: "liver", 6: "stomach", 32: "vertebrae_T12", 52: "aorta"}
"""TotalSegmentator (v2) classes present in the series' label map."""
COLORS = {1: (0.62, 0.21, 0.0), 5: (221, 130, 101), 6: (1.0, 0.5, 0.5), 52: (255, 0, 0)}  # 32: no colour


def _on_grid(labels: Volume, grid: Volume) -> np.ndarray:
    """``labels`` resampled exactly onto ``grid`` when the two differ by axis flips/shifts only."""
    m = np.linalg.inv(labels.geometry.index_to_physical_matrix()) @ grid.geometry.index_to_physical_matrix()
    lin, off = np.round(m[:3, :3]), np.round(m[:3, 3])
    assert np.allclose(m[:3, :3], lin, atol=1e-6) and np.allclose(m[:3, 3], off, atol=1e-3)
    assert np.count_nonzero(lin - np.diag(np.diag(lin))) == 0, "axes are permuted"
    shape_xyz = grid.shape[::-1]
    x, y, z = (int(lin[i, i]) * np.arange(shape_xyz[i]) + int(off[i]) for i in range(3))
    return labels.array[np.ix_(z, y, x)]


@pytest.fixture(scope="module")
def ct(dicom_series: Path) -> Volume:
    return read_volume(dicom_series)


@pytest.fixture(scope="module")
def organs(ct: Volume, dicom_series_labels: Path) -> np.ndarray:
    labels = _on_grid(read_volume(dicom_series_labels), ct)
    labels = np.where(np.isin(labels, list(ORGANS)), labels, 0).astype(np.uint8)
    assert set(np.unique(labels)) == {0, *ORGANS}
    return labels


@pytest.fixture(scope="module")
def exported(ct: Volume, organs: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rtstruct") / "organs_rtstruct.dcm"
    with pytest.warns(RtStructWarning, match="SeriesInstanceUID"):  # this anonymised series has empty UIDs
        path = export_rtstruct(organs, ct, out, ORGANS, COLORS, model_name="test-model")
    assert path == out and path.is_file()
    return path


def _planes(ct: Volume) -> dict[str, tuple]:
    """SOP instance UID -> (position, row direction, column direction, z index), read with pydicom."""
    out = {}
    for z, file in enumerate(ct.dicom.files):
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        uid = str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)
        out[uid] = (np.asarray([float(v) for v in ds.ImagePositionPatient]), iop[:3], iop[3:],
                    z, [float(v) for v in ds.PixelSpacing])
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_rtstruct_modules_are_consistent(exported: Path, ct: Volume) -> None:
    assert exported.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(exported)
    assert ds.SOPClassUID == RTSTRUCT_SOP_CLASS_UID == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SOPInstanceUID not in ct.dicom.sop_instance_uids
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "RTSTRUCT" and ds.StructureSetLabel
    uids = derived_source_uids(ct.dicom)
    assert ds.StudyInstanceUID == uids["StudyInstanceUID"]
    assert ds.SeriesInstanceUID not in uids.values()

    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == ct.dicom.frame_of_reference_uid
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == uids["StudyInstanceUID"]
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == uids["SeriesInstanceUID"]
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence] == ct.dicom.sop_instance_uids
    assert {str(i.ReferencedSOPClassUID) for i in series.ContourImageSequence} == {ct.dicom.sop_class_uid}

    rois = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    assert rtstruct_roi_names(ds) == ORGANS == {n: str(r.ROIName) for n, r in rois.items()}
    assert all(r.ReferencedFrameOfReferenceUID == frame.FrameOfReferenceUID for r in rois.values())
    assert {r.ROIGenerationAlgorithm for r in rois.values()} == {"AUTOMATIC"}
    contours = {int(c.ReferencedROINumber): c for c in ds.ROIContourSequence}
    observations = {int(o.ReferencedROINumber): o for o in ds.RTROIObservationsSequence}
    assert set(contours) == set(observations) == set(rois) == set(ORGANS)
    assert len({int(o.ObservationNumber) for o in observations.values()}) == len(ORGANS)
    assert {o.RTROIInterpretedType for o in observations.values()} == {"ORGAN"}
    assert list(contours[1].ROIDisplayColor) == [158, 54, 0]
    assert list(contours[5].ROIDisplayColor) == [221, 130, 101]
    assert "ROIDisplayColor" not in contours[32]
    for item in contours.values():
        assert len(item.ContourSequence) > 0
        for contour in item.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) * 3 == len(contour.ContourData)
            assert int(contour.NumberOfContourPoints) >= 3


def test_contour_points_lie_on_their_slice_inside_the_image(exported: Path, ct: Volume, organs: np.ndarray) -> None:
    ds = pydicom.dcmread(exported)
    planes = _planes(ct)
    rows, cols = ct.shape[1:]
    worst = 0.0
    for item in ds.ROIContourSequence:
        value = int(item.ReferencedROINumber)
        slices = set()
        for contour in item.ContourSequence:
            (ref,) = contour.ContourImageSequence
            uid = str(ref.ReferencedSOPInstanceUID)
            assert uid in planes, "a contour references an image that is not in the source series"
            position, row_dir, col_dir, z, (row_spacing, col_spacing) = planes[uid]
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            normal = np.cross(row_dir, col_dir)
            distance = np.abs((points - position) @ normal)
            worst = max(worst, float(distance.max()))
            assert distance.max() < 1e-3, f"ROI {value}: contour {distance.max():.2g} mm off its slice plane"
            # pixel coordinates: column along the row direction, row along the column direction
            col = (points - position) @ row_dir / col_spacing
            row = (points - position) @ col_dir / row_spacing
            assert col.min() >= -0.5 - 1e-6 and col.max() <= cols - 0.5 + 1e-6
            assert row.min() >= -0.5 - 1e-6 and row.max() <= rows - 0.5 + 1e-6
            slices.add(z)
        assert slices == set(np.flatnonzero((organs == value).any(axis=(1, 2))))
    print(f"\nlargest distance of a contour point from its slice plane: {worst:.2g} mm")


def test_round_trip_gives_the_organs_back(exported: Path, ct: Volume, organs: np.ndarray, tmp_path: Path) -> None:
    back = rtstruct_to_labels(exported, ct)
    assert back.shape == ct.shape
    dice = {ORGANS[v]: _dice(back == v, organs == v) for v in ORGANS}
    print(f"\nround-trip Dice (lossless contours): {json.dumps({k: round(d, 5) for k, d in dice.items()})}")
    assert min(dice.values()) >= 0.95, dice
    np.testing.assert_array_equal(back, organs)  # the contours are exact: even-odd fill gives every voxel back

    with pytest.warns(RtStructWarning):
        simplified = export_rtstruct(organs, ct, tmp_path / "simplified.dcm", ORGANS, simplify=0.5)
    back = rtstruct_to_labels(pydicom.dcmread(simplified), ct)
    dice = {ORGANS[v]: _dice(back == v, organs == v) for v in ORGANS}
    print(f"round-trip Dice (simplify=0.5 px): {json.dumps({k: round(d, 5) for k, d in dice.items()})}")
    assert min(dice.values()) >= 0.95, dice
    assert simplified.stat().st_size < 0.75 * exported.stat().st_size

    only = rtstruct_to_labels(exported, ct, roi_values={"liver": 2, "aorta": 9})
    np.testing.assert_array_equal(only == 2, organs == 5)
    np.testing.assert_array_equal(only == 9, organs == 52)
    assert set(np.unique(only)) == {0, 2, 9}


def test_holes_and_islands_survive_the_round_trip(ct: Volume, tmp_path: Path) -> None:
    labels = np.zeros(ct.shape, np.uint8)
    labels[4:7, 100:200, 100:200] = 3  # a square ...
    labels[4:7, 130:170, 130:170] = 0  # ... with a hole ...
    labels[4:7, 145:155, 145:155] = 3  # ... holding an island
    labels[5, 0, 0] = 4  # a single voxel in the corner
    labels[5, 300, 300] = labels[5, 301, 301] = 4  # diagonal neighbours: two contours
    with pytest.warns(RtStructWarning):
        path = export_rtstruct(labels, ct, tmp_path / "ring.dcm", {3: "ring", 4: "dots"})
    ds = pydicom.dcmread(path)
    by_roi = {int(c.ReferencedROINumber): c.ContourSequence for c in ds.ROIContourSequence}
    assert len(by_roi[3]) == 3 * 3  # outer boundary, hole and island on each of the 3 slices
    assert len(by_roi[4]) == 3 and all(int(c.NumberOfContourPoints) == 4 for c in by_roi[4])
    back = rtstruct_to_labels(path, ct)
    np.testing.assert_array_equal(back, labels)
    assert back[5, 150, 150] == 3 and back[5, 135, 135] == 0


def test_slice_contours() -> None:
    assert slice_contours(np.zeros((5, 5), bool)) == []
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    (diamond,) = slice_contours(one)
    assert sorted(map(tuple, diamond.tolist())) == [(1.5, 2.0), (2.0, 1.5), (2.0, 2.5), (2.5, 2.0)]
    square = np.ones((4, 6), bool)
    (outline,) = slice_contours(square)  # straight runs collapse; touching the border is fine
    assert len(outline) == 8 and outline.min() == -0.5 and outline[:, 0].max() == 3.5
    with pytest.raises(ValueError, match="2D"):
        slice_contours(np.ones((2, 2, 2), bool))


def test_references_a_series_with_real_uids(real_uid_series: tuple[Path, str, str], tmp_path: Path) -> None:
    copy, study, series = real_uid_series
    scan = read_volume(copy)
    labels = np.zeros(scan.shape, np.uint8)
    labels[3:8, 200:260, 220:300] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RtStructWarning)
        path = export_rtstruct(labels, scan, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == study
    ref_series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == series
    assert rtstruct_roi_names(path) == {1: "label 1"}
    np.testing.assert_array_equal(rtstruct_to_labels(path, scan), labels)


def test_errors_are_clear_and_leave_nothing_behind(ct: Volume, tmp_path: Path) -> None:
    nifti_like = Volume(np.zeros((4, 5, 6), np.int16), Geometry((1, 1, 1), (0, 0, 0)), path=Path("scan.nii.gz"))
    with pytest.raises(DicomSourceError, match="RTSTRUCT needs a DICOM source series.*scan.nii.gz"):
        export_rtstruct(np.ones((4, 5, 6), np.uint8), nifti_like, tmp_path / "a.dcm")
    with pytest.raises(ExportError, match="empty"):
        export_rtstruct(np.zeros(ct.shape, np.uint8), ct, tmp_path / "b.dcm")
    with pytest.raises(ExportError, match="differs from the scan grid"):
        export_rtstruct(np.ones((4, 5, 6), np.uint8), ct, tmp_path / "c.dcm")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not an RTSTRUCT"):
        rtstruct_to_labels(ct.dicom.files[0], ct)


def test_cli_export_writes_an_rtstruct(dicom_series: Path, ct: Volume, tmp_path: Path, capsys) -> None:
    labels = np.zeros(ct.shape, np.uint8)
    labels[5:9, 200:260, 220:300] = 1
    labels[6, 230:240, 250:260] = 0  # a hole
    labels_path = write_labels(labels, like=ct, path=tmp_path / "case_labels.nii.gz")
    out = tmp_path / "export"
    code = main(["export", str(labels_path), "--scan", str(dicom_series), "-o", str(out),
                 "--formats", "rtstruct", "--json"])
    assert code == 0, capsys.readouterr().err
    (written,) = [Path(p) for p in json.loads(capsys.readouterr().out)["written"]]
    assert written.name == "case_labels_rtstruct.dcm"
    np.testing.assert_array_equal(rtstruct_to_labels(written, ct), labels)
    # a NIfTI scan cannot be the source of an RTSTRUCT: exit 1 with the reason on stderr
    code = main(["export", str(labels_path), "--scan", str(labels_path), "-o", str(out / "nifti"),
                 "--formats", "rtstruct"])
    err = capsys.readouterr().err
    assert code == 1 and "RTSTRUCT needs a DICOM source series" in err
