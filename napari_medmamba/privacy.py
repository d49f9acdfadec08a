"""Privacy helpers (Qt-free): a network guard, DICOM de-identification, autosave listing/clearing.

napari-medmamba never opens a network connection at run time; :func:`no_network` lets a
site (or a test) prove it: inside the block every attempt to resolve a host name or open
a connection raises :class:`NetworkBlockedError` and is counted.

:func:`deidentify_dataset` applies the subset of the DICOM PS3.15 Basic Application Level
Confidentiality Profile that a derived object (DICOM-SEG) needs: patient and study
identifiers replaced or emptied, identifying free text, dates of birth, institution and
device details, and private tags removed, and every UID replaced by a new one derived
from the original through a per-export random salt (see :class:`UidMap`).

:func:`list_autosaves` / :func:`clear_autosaves` show and delete every autosave in the
per-user autosave folder (see :mod:`napari_medmamba.annotation.autosave`).
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = [
    "NetworkBlockedError",
    "NetworkGuard",
    "no_network",
    "UidMap",
    "deidentify_dataset",
    "DEIDENTIFIED_PATIENT_NAME",
    "IDENTIFYING_KEYWORDS",
    "list_autosaves",
    "clear_autosaves",
]


# ---- network guard -------------------------------------------------------------------------------------------


class NetworkBlockedError(ConnectionRefusedError):
    """A network access was attempted inside :func:`no_network`."""


@dataclass
class NetworkGuard:
    """What :func:`no_network` saw: one entry per attempted network access."""

    attempts: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _refuse(self, what: str) -> None:
        with self._lock:
            self.attempts.append(what)
        raise NetworkBlockedError(f"network access blocked by napari_medmamba.privacy.no_network: {what}")


def _is_local_unix(sock: Any) -> bool:
    family = getattr(sock, "family", None)
    return family is not None and family == getattr(socket, "AF_UNIX", object())


_LOOPBACK = {"127.0.0.1", "::1"}


def _is_loopback_bind(name: str, args: tuple) -> bool:
    """``bind`` to the loopback address: nothing can reach it from, or send through it to, another machine
    (urllib3 probes IPv6 support this way when it is imported)."""
    return name == "bind" and bool(args) and isinstance(args[0], tuple) and args[0][:1] and args[0][0] in _LOOPBACK


@contextmanager
def no_network(allow_unix_sockets: bool = True) -> Iterator[NetworkGuard]:
    """Block (and count) host name lookups and socket connections in this process.

    Patches ``socket.socket.connect``/``connect_ex``/``sendto``/``bind``,
    ``socket.create_connection``, ``socket.getaddrinfo``, ``socket.gethostbyname`` and
    ``socket.gethostbyname_ex``. Unix-domain sockets (local inter-process
    communication, no network) are allowed unless ``allow_unix_sockets`` is False; so is
    binding to the loopback address (127.0.0.1 / ::1), which cannot reach another machine.
    Connecting anywhere, loopback included, is refused.
    Yields a :class:`NetworkGuard` whose ``attempts`` lists what was refused.
    """
    guard = NetworkGuard()
    originals: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def method(name: str) -> Any:
        original = getattr(socket.socket, name)

        def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
            if (allow_unix_sockets and _is_local_unix(self)) or _is_loopback_bind(name, args):
                return original(self, *args, **kwargs)
            guard._refuse(f"socket.{name}{args!r}")

        return guarded

    def function(name: str) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            guard._refuse(f"socket.{name}{args!r}")

        return guarded

    for name in ("connect", "connect_ex", "sendto", "bind"):
        patch(socket.socket, name, method(name))
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        patch(socket, name, function(name))
    try:
        yield guard
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


# ---- DICOM de-identification ---------------------------------------------------------------------------------

DEIDENTIFIED_PATIENT_NAME = "ANONYMOUS"

IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "PatientComments", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "AdditionalPatientHistory", "PatientReligiousPreference", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientInsurancePlanCodeSequence", "CountryOfResidence", "RegionOfResidence", "PregnancyStatus",
    # study / visit
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "PerformingPhysicianName", "OperatorsName", "RequestingPhysician",
    "AdmittingDiagnosesDescription", "AdmissionID", "IssuerOfAdmissionIDSequence", "RequestAttributesSequence",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "ScheduledProcedureStepID", "RequestedProcedureID",
    # series / acquisition / equipment
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "ContentDate",
    "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDescription", "ProtocolName",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "ImageComments", "DerivationDescription", "SourceImageSequence", "ReferencedImageSequence",
    "OriginalAttributesSequence", "ContentCreatorName", "TimezoneOffsetFromUTC",
)
"""Attributes removed from a dataset by :func:`deidentify_dataset` (PS3.15 Table E.1-1 subset)."""

_REPLACED = {"PatientName": DEIDENTIFIED_PATIENT_NAME}
_EMPTIED = ("PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName",
            "StudyDate", "StudyTime")
"""Type 2 attributes the patient/study modules need present (kept, but empty or replaced)."""


class UidMap:
    """Replaces DICOM UIDs consistently within one export, irreversibly across exports.

    The same original UID always maps to the same new UID through this map (so references
    between the SEG and its de-identified source stay consistent), and the new UID is
    derived with a random salt, so it cannot be traced back to the original by hashing
    candidate UIDs. Give ``salt`` to reproduce a mapping (keep it secret).
    """

    def __init__(self, salt: str | None = None) -> None:
        self.salt = salt if salt is not None else secrets.token_hex(16)
        self._map: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        from pydicom.uid import generate_uid

        uid = str(uid)
        if not uid:
            return uid
        if uid not in self._map:
            self._map[uid] = str(generate_uid(entropy_srcs=["napari-medmamba deidentify", self.salt, uid]))
        return self._map[uid]


def _is_uid_element(element: Any) -> bool:
    return element.VR == "UI"


def deidentify_dataset(
    ds: Any,
    uid_map: UidMap,
    patient_name: str = DEIDENTIFIED_PATIENT_NAME,
    patient_id: str = "",
) -> Any:
    """A de-identified copy of a pydicom ``Dataset`` (the original is not changed).

    Removes private tags and every attribute in :data:`IDENTIFYING_KEYWORDS` (also inside
    sequences), then sets PatientName to ``patient_name``, PatientID to ``patient_id`` and
    the other type 2 patient/study attributes empty; replaces every UID (VR UI) through
    ``uid_map`` except SOP Class, Transfer Syntax and coding-scheme UIDs, which name
    standards, not patients. Geometry (position, orientation, spacing, size) is kept.
    Sets PatientIdentityRemoved YES and DeidentificationMethod.
    """
    import copy

    out = copy.deepcopy(ds)
    keep_uid = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                "CodingSchemeUID", "ContextUID", "ImplementationClassUID", "AffectedSOPClassUID"}

    def clean(dataset: Any) -> None:
        dataset.remove_private_tags()
        for keyword in IDENTIFYING_KEYWORDS:
            if keyword in dataset:
                delattr(dataset, keyword)
        for element in list(dataset):
            if element.VR == "SQ":
                for item in element.value:
                    clean(item)
            elif _is_uid_element(element) and element.keyword not in keep_uid and element.value:
                if element.VM > 1:
                    element.value = [uid_map(v) for v in element.value]
                else:
                    element.value = uid_map(element.value)

    clean(out)
    meta = getattr(out, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = uid_map(meta.MediaStorageSOPInstanceUID)
    for keyword in _EMPTIED:
        setattr(out, keyword, "")
    out.PatientName = patient_name
    out.PatientID = patient_id
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "napari-medmamba: PS3.15 basic profile subset, UIDs replaced"
    return out


# ---- autosaves -----------------------------------------------------------------------------------------------


def list_autosaves(root: str | PathLike[str] | None = None) -> list[Path]:
    """Every autosave file under ``root`` (default: the per-user autosave folder).

    Autosaves written with ``beside_scan=True`` live next to their scans and are not
    listed (use ``AutosaveSession.clear`` for those).
    """
    from .annotation.autosave import AUTOSAVE_FILE, default_autosave_root

    folder = Path(root).expanduser() if root is not None else default_autosave_root()
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.is_symlink():
            candidate = child / AUTOSAVE_FILE
            if candidate.is_file() and not candidate.is_symlink():
                found.append(candidate)
    return found


def clear_autosaves(root: str | PathLike[str] | None = None) -> int:
    """Delete every autosave under ``root`` (default: the per-user folder); returns how many.

    Also removes leftover temporary files of interrupted saves, and each autosave
    folder once it is empty. Other files are left alone.
    """
    from .annotation.autosave import AUTOSAVE_FILE, default_autosave_root

    folder = Path(root).expanduser() if root is not None else default_autosave_root()
    if not folder.is_dir():
        return 0
    removed = 0
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        for entry in child.iterdir():
            is_autosave = entry.name == AUTOSAVE_FILE
            is_temp = entry.name.startswith(f".{AUTOSAVE_FILE}.tmp-")
            if (is_autosave or is_temp) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
                removed += is_autosave
        try:
            child.rmdir()
        except OSError:
            pass  # other files in it
    return removed
