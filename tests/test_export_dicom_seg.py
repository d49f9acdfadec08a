"""DICOM-SEG export on the real CT series, read back with highdicom and pydicom."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_medmamba.export import DicomSourceError, ExportError, derived_source_uids, export_dicom_seg
from napari_medmamba.export.dicom_seg import DicomSegWarning
from napari_medmamba.io import Geometry, Volume, read_volume

hd = pytest.importorskip("highdicom")

NAMES = {3: "liver", 7: "lesion"}
COLORS = {3: (0.8, 0.3, 0.2), 7: (20, 200, 40)}


def _mask(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[2:9, 100:220, 150:300] = 3
    labels[6:14, 300:340, 200:260] = 7  # overlaps liver's slices, different rows
    labels[11, 0:5, 0:5] = 7  # a voxel block touching the image corner
    return labels


@pytest.fixture(scope="module")
def ct(dicom_series: Path) -> Volume:
    return read_volume(dicom_series)


def _frames_by_source(ds: pydicom.Dataset) -> dict[tuple[str, int], np.ndarray]:
    """Independent read with pydicom: (source SOP instance UID, segment number) -> frame."""
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    out = {}
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[(str(uid), number)] = pixels[f]
    return out


def _check_seg(path: Path, ct: Volume, labels: np.ndarray, series_uid: str, frame_uid: str) -> None:
    seg = hd.seg.segread(path)
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= set(ct.dicom.sop_instance_uids)
    assert seg.FrameOfReferenceUID == frame_uid
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["liver", "lesion"]
    desc = seg.get_segment_description(1)
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    assert desc.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "test-model"

    # highdicom: per-segment masks in the source's z order equal the exported labels
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ct.dicom.sop_instance_uids,
        segment_numbers=[1, 2],
        combine_segments=False,
        ignore_spatial_locations=True,
    )
    assert masks.shape == (*ct.shape, 2)
    np.testing.assert_array_equal(masks[..., 0] > 0, labels == 3)
    np.testing.assert_array_equal(masks[..., 1] > 0, labels == 7)

    # pydicom: the same, frame by frame from the functional groups
    frames = _frames_by_source(pydicom.dcmread(path))
    for z, uid in enumerate(ct.dicom.sop_instance_uids):
        for number, value in ((1, 3), (2, 7)):
            expected = labels[z] == value
            frame = frames.get((uid, number))
            if frame is None:
                assert not expected.any(), f"missing frame for slice {z}, segment {number}"
            else:
                np.testing.assert_array_equal(frame.astype(bool), expected)


def test_dicom_seg_of_the_real_series(ct: Volume, tmp_path: Path) -> None:
    labels = _mask(ct.shape)
    with pytest.warns(DicomSegWarning, match="SeriesInstanceUID"):  # this anonymised series has empty UIDs
        path = export_dicom_seg(labels, ct, NAMES, COLORS, tmp_path / "seg.dcm", model_name="test-model")
    uids = derived_source_uids(ct.dicom)
    assert uids == derived_source_uids(ct.dicom)  # deterministic: repeated exports reference the same series
    assert uids["FrameOfReferenceUID"] == ct.dicom.frame_of_reference_uid
    _check_seg(path, ct, labels, uids["SeriesInstanceUID"], ct.dicom.frame_of_reference_uid)
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == uids["StudyInstanceUID"]
    lab = ds.SegmentSequence[1].RecommendedDisplayCIELabValue
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(lab)).to_rgb()
    assert np.allclose(rgb, (20, 200, 40), atol=2)


def test_dicom_seg_references_the_source_series_uid(real_uid_series: tuple[Path, str, str], tmp_path: Path) -> None:
    """A copy of the series with real UIDs: the SEG references exactly those."""
    copy, study, series = real_uid_series
    ct = read_volume(copy)
    assert ct.dicom.series_instance_uid == series
    labels = _mask(ct.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DicomSegWarning)
        path = export_dicom_seg(labels, ct, NAMES, COLORS, tmp_path / "seg.dcm", model_name="test-model")
    _check_seg(path, ct, labels, series, ct.dicom.frame_of_reference_uid)
    assert pydicom.dcmread(path).StudyInstanceUID == study


def test_semiautomatic_when_edited(ct: Volume, tmp_path: Path) -> None:
    from napari_medmamba.annotation import EditLog

    log = EditLog(ct.shape)
    log.record("paint", np.array([0]), labels=[3])
    labels = _mask(ct.shape)
    with pytest.warns(DicomSegWarning):
        path = export_dicom_seg(labels, ct, NAMES, None, tmp_path / "seg.dcm", model_name="test-model", edit_log=log)
    assert hd.seg.segread(path).get_segment_description(1).SegmentAlgorithmType == "SEMIAUTOMATIC"


def test_errors_name_the_file_and_leave_nothing_behind(ct: Volume, tmp_path: Path) -> None:
    nifti_like = Volume(np.zeros((4, 5, 6), np.int16), Geometry((1, 1, 1), (0, 0, 0)), path=Path("scan.nii.gz"))
    with pytest.raises(DicomSourceError, match="needs a DICOM source"):
        export_dicom_seg(np.ones((4, 5, 6), np.uint8), nifti_like, NAMES, None, tmp_path / "a.dcm")
    with pytest.raises(ExportError, match="differs from the scan grid"):
        export_dicom_seg(np.ones((4, 5, 6), np.uint8), ct, NAMES, None, tmp_path / "b.dcm")
    with pytest.raises(ExportError, match="empty"):
        export_dicom_seg(np.zeros(ct.shape, np.uint8), ct, NAMES, None, tmp_path / "c.dcm")
    with pytest.raises(ExportError, match="algorithm_type"):
        export_dicom_seg(_mask(ct.shape), ct, NAMES, None, tmp_path / "d.dcm", algorithm_type="GUESSED")
    assert list(tmp_path.iterdir()) == []
