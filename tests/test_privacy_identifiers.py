"""Exports carry exactly the identifiers chosen (issue #14).

A synthetic patient is made from the real CT series (its headers rewritten with a made-up
name, ID, birth date, accession number, institution ...) in a folder and under file names
that hold the patient's name. Every export is written and every byte written (also
gzip-decompressed) is scanned for those identifiers: only the DICOM-SEG may hold the
name, ID and birth date (and must), and so may the RTSTRUCT; nothing else, and no file name,
may hold any. With ``deidentify=True`` the DICOM-SEG and the RTSTRUCT hold none of them, nor
any UID of the source.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_medmamba.annotation import LabelHistory
from napari_medmamba.export import (derived_source_uids, export_dicom_seg, export_meshes, export_rtstruct,
                                    export_summary_json, export_volumes_csv, rtstruct_roi_names, write_labels)
from napari_medmamba.io import read_volume, write_volume
from napari_medmamba.privacy import UidMap, deidentify_dataset

hd = pytest.importorskip("highdicom")

PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-123456",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "AccessionNumber": "ACC-987654",
    "InstitutionName": "St Example Hospital",
    "ReferringPhysicianName": "Houseman^Greg",
    "StudyID": "STUDY-4242",
    "PatientAddress": "1 Privacy Lane",
    "OtherPatientIDs": "OTHER-ID-777",
    "StudyDescription": "Secret study for Doe",
}
ALLOWED_IN_SEG = ("Doe^Jane", "PID-123456", "19700101")
"""What a non-de-identified DICOM-SEG (and RTSTRUCT) must carry (copied from the source)."""
NEVER = ("Doe^Jane", "Jane Doe", "PID-123456", "19700101", "ACC-987654", "St Example Hospital", "Houseman",
         "STUDY-4242", "Privacy Lane", "OTHER-ID-777")
"""Identifiers no other export may carry (and a de-identified SEG neither).

Whole identifiers only: 3-4 byte pieces such as "Doe" occur by chance in compressed voxel data."""
SEG_NEVER = ("Secret study", "Petersgraben", "PETCT2")
"""Further text a de-identified SEG must not carry (study description, the real series' site address/station)."""
NAMES = {1: "liver", 2: "lesion"}
COLORS = {1: (200, 80, 50), 2: (20, 200, 40)}


def _variants(text: str) -> list[bytes]:
    """The identifier as bytes in the encodings a file could hold it in."""
    out = {text.encode("utf-8"), text.encode("utf-16-le"), text.upper().encode(), text.lower().encode()}
    if "^" in text:
        out |= {text.replace("^", " ").encode(), text.replace("^", "_").encode()}
    return sorted(out)


def _all_bytes(path: Path) -> bytes:
    """The file's bytes, plus its decompressed content when it is gzip or zlib compressed."""
    data = path.read_bytes()
    chunks = [data]
    if data[:2] == b"\x1f\x8b":
        chunks.append(gzip.decompress(data))
    elif path.suffix in (".nrrd", ".mha", ".nhdr", ".mhd", ".raw", ".zraw", ".gz"):
        for start in range(0, min(len(data), 4096)):  # embedded zlib stream after a text header
            if data[start:start + 1] in (b"\x78",) and data[start + 1:start + 2] in (b"\x01", b"\x5e", b"\x9c", b"\xda"):
                try:
                    chunks.append(zlib.decompressobj().decompress(data[start:]))
                    break
                except zlib.error:
                    continue
    return b"\n".join(chunks)


def _found(path: Path, identifiers: tuple[str, ...]) -> set[str]:
    data = _all_bytes(path)
    return {ident for ident in identifiers if any(v in data for v in _variants(ident))}


@pytest.fixture(scope="module")
def patient_folder(dicom_series: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CT series as 'Doe^Jane' in a folder named after her (as exported from a PACS)."""
    folder = tmp_path_factory.mktemp("privacy") / "Doe_Jane_PID-123456"
    folder.mkdir()
    for src in sorted(dicom_series.iterdir()):
        ds = pydicom.dcmread(src)
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.save_as(folder / src.name, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def exported(patient_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Every export of a corrected label map on the synthetic patient's scan."""
    ct = read_volume(patient_folder)
    assert ct.dicom is not None and ct.dicom.patient["PatientName"] == "Doe^Jane"
    labels = np.zeros(ct.shape, np.uint8)
    history = LabelHistory(labels)
    history.apply("paint", 1, region=np.s_[2:9, 100:200, 150:260])
    history.apply("paint", 2, region=np.s_[6:14, 300:340, 200:260])
    history.apply("erase", 0, region=np.s_[3:4, 120:130, 160:170])
    history.undo()
    out = tmp_path_factory.mktemp("exports")
    files: dict[str, list[Path]] = {"volumes": [], "other": [], "seg": [], "seg_deid": [], "rt": [], "rt_deid": []}
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        files["volumes"].append(write_labels(labels, ct, out / f"labels{ext}"))
        files["volumes"].append(write_volume(ct, out / f"scan{ext}"))  # the scan itself, re-written
    files["other"].append(export_volumes_csv(labels, ct.geometry, NAMES, out / "volumes.csv"))
    files["other"] += export_meshes(labels, ct.geometry, NAMES, out / "meshes", "stl")
    files["other"] += export_meshes(labels, ct.geometry, NAMES, out / "meshes", "obj")
    files["other"].append(export_summary_json(out / "summary.json", NAMES, label_colors=COLORS, labels=labels,
                                              geometry=ct.geometry, model_name="test", edit_log=history.edit_log))
    files["seg"].append(export_dicom_seg(labels, ct, NAMES, COLORS, out / "seg.dcm", edit_log=history.edit_log))
    files["seg_deid"].append(export_dicom_seg(labels, ct, NAMES, COLORS, out / "seg_deid.dcm", deidentify=True))
    files["rt"].append(export_rtstruct(labels, ct, out / "rtstruct.dcm", NAMES, COLORS, edit_log=history.edit_log))
    files["rt_deid"].append(export_rtstruct(labels, ct, out / "rtstruct_deid.dcm", NAMES, COLORS, deidentify=True))
    everything = sorted(p for p in out.rglob("*") if p.is_file())
    listed = {p for group in files.values() for p in group}
    files["unlisted"] = [p for p in everything if p not in listed]  # e.g. .raw/.zraw data files of .nhdr/.mhd
    return files


def test_volume_headers_tables_meshes_and_json_carry_no_identifier(exported: dict[str, list[Path]],
                                                                   patient_folder: Path) -> None:
    checked = exported["volumes"] + exported["other"] + exported["unlisted"]
    assert len(checked) >= 12 + 1 + 4 + 1
    leaks = {str(p.name): found for p in checked if (found := _found(p, NEVER + ("Secret study",)))}
    assert not leaks, leaks
    # nor the source folder's path (it holds the patient's name)
    assert not [p for p in checked if str(patient_folder).encode() in _all_bytes(p)]


def test_no_written_file_name_holds_an_identifier(exported: dict[str, list[Path]]) -> None:
    for group in exported.values():
        for path in group:
            assert not any(v.decode(errors="ignore").lower() in path.name.lower()
                           for ident in NEVER for v in _variants(ident)), path


def test_dicom_seg_copies_patient_and_study_identifiers_only(exported: dict[str, list[Path]],
                                                            patient_folder: Path) -> None:
    (seg_path,) = exported["seg"]
    assert _found(seg_path, ALLOWED_IN_SEG) == set(ALLOWED_IN_SEG)
    leaks = _found(seg_path, ("St Example Hospital", "Privacy Lane", "OTHER-ID-777", "Petersgraben", "PETCT2"))
    assert not leaks, f"the SEG copied more than the patient/study modules: {leaks}"
    seg = pydicom.dcmread(seg_path)
    source = pydicom.dcmread(next(patient_folder.iterdir()), stop_before_pixels=True)
    assert str(seg.PatientName) == "Doe^Jane" and seg.PatientID == "PID-123456"
    assert seg.PatientBirthDate == "19700101" and seg.PatientSex == "F"
    uids = derived_source_uids(read_volume(patient_folder).dicom)  # this anonymised series lacks a study UID
    assert seg.StudyInstanceUID == (source.StudyInstanceUID or uids["StudyInstanceUID"])
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    # General Study module attributes a SEG shares with its source study:
    assert seg.AccessionNumber == "ACC-987654" and seg.StudyID == "STUDY-4242"
    assert str(seg.ReferringPhysicianName) == "Houseman^Greg"
    # ... but nothing outside the patient/study modules is copied (no site, no private tags):
    for keyword in ("InstitutionName", "InstitutionAddress", "PatientAddress", "OtherPatientIDs", "StationName"):
        assert keyword not in seg
    for item in seg.get("ContributingEquipmentSequence", []):
        assert not {"InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber"} & set(item.dir())
    assert not [e for e in seg if e.tag.is_private]


def _source_uids_in(path: Path, patient_folder: Path) -> list[str]:
    """The source series' UIDs (real and derived) that appear anywhere in the bytes of ``path``."""
    source_uids = set()
    for file in patient_folder.iterdir():
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        source_uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    source_uids |= set(derived_source_uids(read_volume(patient_folder).dicom).values())
    source_uids.discard("")
    data = path.read_bytes()
    return [uid for uid in source_uids if uid.encode() in data]


def _assert_deidentified(path: Path, patient_folder: Path) -> pydicom.Dataset:
    """No identifier and no source UID in the file's bytes; anonymous patient module; the dataset."""
    leaks = _found(path, NEVER + SEG_NEVER)
    assert not leaks, leaks
    assert not _source_uids_in(path, patient_folder)
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) == "ANONYMOUS" and ds.PatientID == "" and ds.get("PatientBirthDate", "") == ""
    assert ds.PatientIdentityRemoved == "YES"
    return ds


def test_deidentified_dicom_seg_carries_no_identifier_and_no_source_uid(exported: dict[str, list[Path]],
                                                                       patient_folder: Path) -> None:
    (seg_path,) = exported["seg_deid"]
    seg = _assert_deidentified(seg_path, patient_folder)
    # still a valid SEG with the same segments and frames
    parsed = hd.seg.segread(seg_path)
    assert [parsed.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["liver", "lesion"]
    assert int(seg.NumberOfFrames) == int(pydicom.dcmread(exported["seg"][0]).NumberOfFrames)


def test_rtstruct_copies_patient_and_study_identifiers_only(exported: dict[str, list[Path]],
                                                            patient_folder: Path) -> None:
    (rt_path,) = exported["rt"]
    assert _found(rt_path, ALLOWED_IN_SEG) == set(ALLOWED_IN_SEG)
    leaks = _found(rt_path, ("St Example Hospital", "Privacy Lane", "OTHER-ID-777", "Petersgraben", "PETCT2",
                             "Secret study"))
    assert not leaks, f"the RTSTRUCT copied more than the patient/study modules: {leaks}"
    rt = pydicom.dcmread(rt_path)
    seg = pydicom.dcmread(exported["seg"][0])
    assert str(rt.PatientName) == "Doe^Jane" and rt.PatientID == "PID-123456"
    assert rt.PatientBirthDate == "19700101" and rt.PatientSex == "F"
    assert rt.AccessionNumber == "ACC-987654" and rt.StudyID == "STUDY-4242"
    assert str(rt.ReferringPhysicianName) == "Houseman^Greg"
    assert rt.StudyInstanceUID == seg.StudyInstanceUID  # filed with the scan, like the SEG
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == seg.FrameOfReferenceUID
    for keyword in ("InstitutionName", "InstitutionAddress", "PatientAddress", "OtherPatientIDs", "StationName",
                    "StudyDescription", "DeviceSerialNumber", "PatientIdentityRemoved"):
        assert keyword not in rt
    assert not [e for e in rt if e.tag.is_private]
    assert {r.ROIGenerationAlgorithm for r in rt.StructureSetROISequence} == {"SEMIAUTOMATIC"}  # edited


def test_deidentified_rtstruct_carries_no_identifier_and_no_source_uid(exported: dict[str, list[Path]],
                                                                      patient_folder: Path) -> None:
    (rt_path,) = exported["rt_deid"]
    rt = _assert_deidentified(rt_path, patient_folder)
    # the same structures and contours as the identified RTSTRUCT
    plain = pydicom.dcmread(exported["rt"][0])
    assert rtstruct_roi_names(rt) == rtstruct_roi_names(plain) == NAMES
    count = [len(c.ContourSequence) for c in rt.ROIContourSequence]
    assert count == [len(c.ContourSequence) for c in plain.ROIContourSequence]


def test_deidentify_dataset_is_consistent_and_leaves_the_source_alone(patient_folder: Path) -> None:
    files = sorted(patient_folder.iterdir())[:2]
    originals = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uid_map = UidMap()
    cleaned = [deidentify_dataset(ds, uid_map, patient_name="PSEUDO-1", patient_id="PSEUDO-1") for ds in originals]
    assert originals[0].PatientName == "Doe^Jane"  # copies are changed, not the originals
    a, b = cleaned
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID != originals[0].FrameOfReferenceUID
    assert a.file_meta.MediaStorageSOPInstanceUID != b.file_meta.MediaStorageSOPInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID != originals[0].file_meta.MediaStorageSOPInstanceUID
    assert a.SOPClassUID == originals[0].SOPClassUID
    assert list(a.ImagePositionPatient) == list(originals[0].ImagePositionPatient)
    assert str(a.PatientName) == "PSEUDO-1" and a.PatientBirthDate == "" and "InstitutionName" not in a
    assert UidMap()(originals[0].FrameOfReferenceUID) != a.FrameOfReferenceUID  # salted: a new export, new UIDs
    assert UidMap("s")(originals[0].FrameOfReferenceUID) == UidMap("s")(originals[0].FrameOfReferenceUID)


def test_pseudonym_is_written_instead(exported: dict[str, list[Path]], patient_folder: Path, tmp_path: Path) -> None:
    ct = read_volume(patient_folder)
    labels = np.zeros(ct.shape, np.uint8)
    labels[5:8, 200:220, 200:220] = 1
    path = export_dicom_seg(labels, ct, NAMES, COLORS, tmp_path / "seg.dcm", deidentify=True, pseudonym="CASE-0001")
    seg = pydicom.dcmread(path)
    assert str(seg.PatientName) == "CASE-0001" and seg.PatientID == "CASE-0001"
    assert not _found(path, NEVER)
