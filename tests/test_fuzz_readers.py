"""Hostile input files end in VolumeReadError, never in a crash, a hang or a huge allocation (issue #14).

A mutation corpus of well over 1000 files is built in tmp_path from real data (a MSD
hippocampus NIfTI, NIfTI-2/NRRD/NHDR/MHA/MHD files written from it, three small slices
of the real CT DICOM series): truncations, bit flips, hostile header fields (absurd or
huge declared sizes, bad types and encodings, data files pointing at /dev/zero, a pipe
or outside the folder), malformed DICOM tags, symlinks out of a DICOM folder, pipes and
odd file names. A seeded ``random.Random`` makes the corpus the same on every run.

Every case is read with ``read_volume`` in worker processes (two, in parallel) that run
under an address-space limit of 2 GiB (RLIMIT_AS): a reader that allocated what a
hostile header declares would fail there. Each case must end in a successful read or a
``VolumeReadError``; any other exception, a crashed worker or a case that takes longer
than PER_CASE_TIMEOUT_S is reported with the case's name (the worker is restarted after
the culprit, so one run reports every failure).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.skipif(sys.platform.startswith("win"), reason="resource limits, pipes and symlinks")

SEED = int(os.environ.get("MEDMAMBA_FUZZ_SEED", "20261125"))
"""Corpus seed; set MEDMAMBA_FUZZ_SEED to explore other corpora (e.g. nightly)."""
MIN_CASES = 2000
PER_CASE_TIMEOUT_S = 15.0
ADDRESS_SPACE_LIMIT = 2 * 1024**3

WORKER = r"""
import json, os, resource, sys, traceback
cases_file, log_file, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from napari_medmamba.io import VolumeReadError, read_volume
cases = json.load(open(cases_file))
with open(log_file, "a", buffering=1) as log:
    for i in range(start, len(cases)):
        log.write(json.dumps(["start", i]) + "\n")
        try:
            volume = read_volume(cases[i])
            result = f"ok {volume.shape}"
        except VolumeReadError:
            result = "refused"
        except BaseException as exc:
            result = "BAD " + type(exc).__name__ + ": " + str(exc).replace("\n", " ")[:300]
        log.write(json.dumps(["done", i, result]) + "\n")
"""


# ---- corpus ---------------------------------------------------------------------------------------------------


class Corpus:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.cases: list[tuple[str, str]] = []  # (kind, path)
        self.must_refuse: set[str] = set()
        self._n = 0

    def new_path(self, name: str) -> Path:
        self._n += 1
        folder = self.root / f"c{self._n:05d}"
        folder.mkdir()
        return folder / name

    def add(self, kind: str, path: Path, must_refuse: bool = False) -> None:
        self.cases.append((kind, str(path)))
        if must_refuse:
            self.must_refuse.add(str(path))


def _truncate(data: bytes, rng: random.Random) -> bytes:
    cut = rng.choice([rng.randrange(0, min(len(data), 600)), rng.randrange(0, len(data))])
    return data[:cut]


def _bitflip(data: bytes, rng: random.Random, header: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 24)):
        where = rng.randrange(0, min(len(out), header)) if rng.random() < 0.8 else rng.randrange(0, len(out))
        out[where] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite(data: bytes, rng: random.Random, header: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        where = rng.randrange(0, min(len(out), header))
        out[where:where + 4] = rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                          b"\x80\x00\x00\x00", b"\x00\x00\x80\x7f", b"\x01\x00\x00\x00"])
    return bytes(out)[:len(data)]


def _byte_mutation(data: bytes, rng: random.Random, header: int) -> bytes:
    return rng.choice([_truncate, lambda d, r: _bitflip(d, r, header), lambda d, r: _overwrite(d, r, header)])(
        data, rng)


# NIfTI-1 header field offsets (little endian)
_NIFTI1_FIELDS = {
    "sizeof_hdr": (0, "i"), "dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"),
    "vox_offset": (108, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"), "qform_code": (252, "h"),
    "sform_code": (254, "h"), "quatern": (256, "6f"), "srow": (280, "12f"),
}
_NIFTI2_FIELDS = {"dim": (16, "8q"), "datatype": (12, "h"), "bitpix": (14, "h"), "vox_offset": (168, "q"),
                  "pixdim": (104, "8d")}
_HOSTILE_INT = [0, -1, 1, 3, 4, 7, 8, 255, 32767, -32768, 2**15 - 1, 2**16, 2**31 - 1, 2**31, 2**40, 2**62]
_HOSTILE_FLOAT = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e308, 1e-308, 3.4e38, 1e30, 352.0,
                  1e12]


def _fit(fmt: str, value: float | int) -> float | int:
    code = fmt[-1]
    if code == "d":
        return float(value)
    if code == "f":
        value = float(value)
        return value if value != value or abs(value) <= 3.4e38 else float("inf") * (1 if value > 0 else -1)
    bits = {"h": 16, "i": 32, "q": 64}[code]
    value = int(value) if value == value and abs(value) != float("inf") else 0
    return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, value))


def _nifti_field_mutation(raw: bytes, rng: random.Random, fields: dict) -> bytes:
    out = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(sorted(fields))
        offset, fmt = fields[name]
        count = int(fmt[:-1] or 1)
        values = list(struct.unpack_from("<" + fmt, out, offset))
        if name == "dim" and rng.random() < 0.5:
            ndim = rng.choice([0, 1, 2, 3, 3, 3, 4, 5, 7, 8, -1])
            values = [ndim] + [rng.choice(_HOSTILE_INT + [v for v in values[1:4]]) for _ in range(7)]
        else:
            k = rng.randrange(count)
            pool = _HOSTILE_FLOAT if fmt[-1] in "fd" else _HOSTILE_INT
            values[k] = rng.choice(pool)
        struct.pack_into("<" + fmt, out, offset, *[_fit(fmt, v) for v in values])
    return bytes(out)


def _set_nifti_dims(raw: bytes, dims: tuple[int, ...], nifti2: bool) -> bytes:
    out = bytearray(raw)
    if nifti2:
        struct.pack_into("<8q", out, 16, len(dims), *dims, *([1] * (7 - len(dims))))
    else:
        wrapped = [((d + 2**15) % 2**16) - 2**15 for d in dims]  # int16 fields: 46341 reads as -19195
        struct.pack_into("<8h", out, 40, len(dims), *wrapped, *([1] * (7 - len(dims))))
    return bytes(out)


_NRRD_VALUES = {
    "sizes": ["100000 100000 100000", "0 10 10", "-5 10 10", "10 10", "10 10 10 10", "abc def ghi",
              "18446744073709551615 1 1", "2147483648 2147483648 2147483648", "1200 1000 1000", "1 1 1",
              "99999999999999999999999 1 1", "32 32 2000000"],
    "type": ["float", "double", "uchar", "int64", "block", "bogus", "unsigned long long int"],
    "encoding": ["raw", "gzip", "bzip2", "hex", "ascii", "bogus", "txt"],
    "dimension": ["0", "1", "2", "4", "16", "-1", "99999"],
    "space directions": ["none none none", "(0,0,0) (0,0,0) (0,0,0)", "(nan,0,0) (0,1,0) (0,0,1)",
                         "(1e308,0,0) (0,1e308,0) (0,0,1e308)", "(1,0) (0,1)", "garbage"],
    "data file": ["../../../../../../etc/passwd", "/dev/zero", "FIFO", "nonexistent.raw", "LIST", "%d.raw 1 10 1",
                  "/dev/urandom", "../outside.raw"],
    "endian": ["big", "weird"],
    "space": ["bogus", "left-posterior-superior", "3D-right-handed"],
    "byte skip": ["-1", "99999999999", "1000000"],
    "line skip": ["-1", "99999999", "5"],
    "space origin": ["(nan,nan,nan)", "(1,2)", "garbage"],
    "kinds": ["RGB-color domain domain", "list list list", "garbage"],
}
_META_VALUES = {
    "DimSize": ["100000 100000 100000", "0 10 10", "-5 10 10", "10 10", "abc", "18446744073709551615 1 1",
                "2147483648 2147483648 2147483648", "1200 1000 1000", "32 32 2000000", "1 1 1"],
    "ElementType": ["MET_FLOAT", "MET_OTHER", "bogus", "MET_DOUBLE_ARRAY", "MET_ULONG_LONG", "MET_NONE"],
    "NDims": ["0", "1", "2", "4", "100", "-1"],
    "ElementDataFile": ["/dev/zero", "../../../../../../etc/passwd", "LIST", "FIFO", "a%d.raw 1 1000 1",
                        "nonexistent.raw", "/dev/urandom", "../outside.raw"],
    "CompressedData": ["True", "False", "bogus"],
    "CompressedDataSize": ["0", "-1", "99999999999", "5"],
    "ElementNumberOfChannels": ["3", "0", "-1", "100000"],
    "HeaderSize": ["-1", "99999999", "100", "0"],
    "TransformMatrix": ["0 0 0 0 0 0 0 0 0", "nan 0 0 0 1 0 0 0 1", "1 0 0"],
    "ElementSpacing": ["0 0 0", "nan 1 1", "-1 -1 -1", "1e308 1e308 1e308"],
    "BinaryDataByteOrderMSB": ["True", "bogus"],
    "ObjectType": ["Image", "Mesh", "bogus"],
}


def _text_header_split(data: bytes, marker: bytes) -> tuple[list[bytes], bytes]:
    """(header lines, rest) of a NRRD/MetaImage file."""
    end = data.find(marker)
    if end < 0:
        return data.split(b"\n"), b""
    head = data[:end]
    return head.split(b"\n"), data[end:]


def _mutate_text_header(data: bytes, rng: random.Random, kind: str) -> bytes:
    if kind == "nrrd":
        lines, rest = _text_header_split(data, b"\n\n")
        separator, values = ": ", _NRRD_VALUES
    else:
        marker = b"ElementDataFile"
        start = data.find(marker)
        eol = data.find(b"\n", start) if start >= 0 else -1
        head, rest = (data[:eol], data[eol:]) if eol >= 0 else (data, b"")
        lines, separator, values = head.split(b"\n"), " = ", _META_VALUES
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(values))
        value = rng.choice(values[key])
        line = f"{key}{separator}{value}".encode()
        for i, existing in enumerate(lines):
            if existing.split(b":" if kind == "nrrd" else b"=", 1)[0].strip() == key.encode():
                lines[i] = line
                break
        else:
            lines.insert(rng.randrange(1, len(lines) + 1) if len(lines) > 1 else 1, line)
    return b"\n".join(lines) + rest


_DICOM_TAG_VALUES = {
    "Rows": [0, 1, 65535, 30000, 20000, 7], "Columns": [0, 1, 65535, 30000, 20000, 7],
    "BitsAllocated": [0, 1, 7, 12, 32, 64, 65535], "BitsStored": [0, 1, 17, 64, 65535],
    "HighBit": [0, 31, 65535], "PixelRepresentation": [0, 1, 2, 65535],
    "SamplesPerPixel": [0, 3, 4, 65535], "NumberOfFrames": ["0", "2", "-1", "2147483648", "abc"],
    "PixelSpacing": [["0", "0"], ["nan", "1"], ["-1", "-1"], ["1e308", "1e308"], ["1"], ["abc", "def"]],
    "ImagePositionPatient": [["0", "0"], ["nan", "0", "0"], ["1e308", "1e308", "1e308"], ["a", "b", "c"]],
    "ImageOrientationPatient": [["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6, ["1", "0", "0"]],
    "RescaleSlope": ["0", "nan", "inf", "1e308", "abc"], "RescaleIntercept": ["nan", "-1e308", "abc"],
    "SliceThickness": ["0", "-1", "nan"], "SeriesInstanceUID": ["", "1.2.3", "x" * 64],
    "PhotometricInterpretation": ["RGB", "PALETTE COLOR", "YBR_FULL", "BOGUS", ""],
    "PlanarConfiguration": [0, 1, 65535], "SOPInstanceUID": ["", "1.2"],
}


def _dicom_tag_mutation(path: Path, rng: random.Random) -> bool:
    """Set one to three hostile tag values; False when pydicom could not write them."""
    ds = pydicom.dcmread(path)
    for _ in range(rng.randint(1, 3)):
        keyword = rng.choice(sorted(_DICOM_TAG_VALUES))
        value = rng.choice(_DICOM_TAG_VALUES[keyword])
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            return False
    if rng.random() < 0.2:
        ds.PixelData = ds.PixelData[: rng.randrange(0, len(ds.PixelData))]
    try:
        ds.save_as(path, enforce_file_format=False)
    except (ValueError, TypeError, OverflowError, struct.error):
        return False
    return True


def _small_dicom_series(dicom_series: Path, folder: Path) -> list[Path]:
    """Three 48 x 48 uncompressed slices of the real CT series (its real headers otherwise)."""
    from napari_medmamba.io import read_volume

    ct = read_volume(dicom_series)
    folder.mkdir()
    out = []
    for z, source in enumerate(ct.dicom.files[:3]):
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        pixels = np.ascontiguousarray(ct.array[z, 232:280, 232:280].astype(np.int16))
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        path = folder / f"slice{z}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _write_nifti2(volume_path: Path, target: Path) -> None:
    nib = pytest.importorskip("nibabel")
    image = nib.load(str(volume_path))
    nib.save(nib.Nifti2Image(np.asarray(image.dataobj), image.affine), str(target))


def build_corpus(root: Path, hippocampus: Path, dicom_series: Path) -> Corpus:
    rng = random.Random(SEED)
    corpus = Corpus(root, rng)
    seeds = root / "seeds"
    seeds.mkdir()
    nifti_gz = seeds / "seed.nii.gz"
    shutil.copy(sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0], nifti_gz)
    image = sitk.ReadImage(str(nifti_gz))
    for name, compress in (("seed.nii", False), ("seed.nrrd", False), ("seedz.nrrd", True), ("seed.nhdr", False),
                           ("seed.mha", False), ("seedz.mha", True), ("seed.mhd", False)):
        sitk.WriteImage(image, str(seeds / name), compress)
    _write_nifti2(nifti_gz, seeds / "seed2.nii")
    nii1 = (seeds / "seed.nii").read_bytes()
    nii2 = (seeds / "seed2.nii").read_bytes()
    dicom_seed = seeds / "dicom"
    slices = _small_dicom_series(dicom_series, dicom_seed)
    fifo = root / "a_fifo"
    os.mkfifo(fifo)

    # NIfTI-1 (.nii and .nii.gz) and NIfTI-2: byte mutations and header-field mutations
    for i in range(660):
        nifti2 = i % 3 == 2
        raw = nii2 if nifti2 else nii1
        fields = _NIFTI2_FIELDS if nifti2 else _NIFTI1_FIELDS
        header = 540 if nifti2 else 348
        data = _nifti_field_mutation(raw, rng, fields) if rng.random() < 0.6 else _byte_mutation(raw, rng, header)
        if i % 3 == 1:
            path = corpus.new_path("m.nii.gz")
            path.write_bytes(gzip.compress(data, 1) if rng.random() < 0.85 else _byte_mutation(
                gzip.compress(raw, 1), rng, 64))
        else:
            path = corpus.new_path("m.nii")
            path.write_bytes(data)
        corpus.add("nifti2" if nifti2 else "nifti", path)
    # declared sizes far beyond the limit (or int64 overflow) with a tiny file: must be refused
    for dims, nifti2 in (((32767, 32767, 32767), False), ((2**31, 2**31, 2**31), True), ((2**62, 2**62, 4), True),
                         ((2**31 - 1, 2, 2), True), ((46341, 46341, 2), False), ((32767, 32767, 3), False), ((1300, 1300, 1300), False),
                         ((100000, 100000, 100000), True), ((2**21, 2**21, 2**21), True)):
        for suffix in ("h.nii", "h.nii.gz"):
            path = corpus.new_path(suffix)
            data = _set_nifti_dims(nii2 if nifti2 else nii1, dims, nifti2)
            path.write_bytes(gzip.compress(data, 1) if suffix.endswith(".gz") else data)
            corpus.add("nifti-huge", path, must_refuse=True)

    # NRRD / NHDR and MetaImage (MHA / MHD), attached and detached, raw and compressed
    for seed_name, kind, count in (("seed.nrrd", "nrrd", 220), ("seedz.nrrd", "nrrd", 120), ("seed.nhdr", "nrrd", 120),
                                   ("seed.mha", "meta", 220), ("seedz.mha", "meta", 120), ("seed.mhd", "meta", 120)):
        seed = seeds / seed_name
        original = seed.read_bytes()
        for _ in range(count):
            path = corpus.new_path("m" + seed.suffix)
            if seed.suffix in (".nhdr", ".mhd"):
                for extra in seeds.glob(seed.stem + ".*raw*"):
                    shutil.copy(extra, path.parent / extra.name)
                (path.parent / "FIFO").symlink_to(fifo)
            if rng.random() < 0.7:
                data = _mutate_text_header(original, rng, kind)
            else:
                data = _byte_mutation(original, rng, 400)
            path.write_bytes(data)
            corpus.add(kind, path)
    for name, header in (("h.nrrd", "NRRD0004\ntype: short\ndimension: 3\nsizes: {s}\nencoding: raw\n\n"),
                         ("h.mha", "ObjectType = Image\nNDims = 3\nDimSize = {s}\nElementType = MET_SHORT\n"
                                   "ElementDataFile = LOCAL\n")):
        for sizes in ("100000 100000 100000", "2147483648 2147483648 2147483648", "18446744073709551615 1 1",
                      "65536 65536 2", "2000 2000 1000"):
            path = corpus.new_path(name)
            path.write_bytes(header.format(s=sizes).encode() + b"\x00" * 64)
            corpus.add("text-huge", path, must_refuse=True)

    # DICOM: hostile tags, byte mutations, folders and single files
    made = 0
    while made < 600:
        folder = corpus.new_path("series")
        folder.mkdir()
        copies = [shutil.copy(s, folder / s.name) for s in slices]
        victim = Path(rng.choice(copies))
        if rng.random() < 0.6:
            victims = [Path(c) for c in copies] if rng.random() < 0.3 else [victim]
            if not all(_dicom_tag_mutation(v, random.Random(rng.random())) for v in victims):
                shutil.rmtree(folder)
                continue
        else:
            victim.write_bytes(_byte_mutation(victim.read_bytes(), rng, 900))
        corpus.add("dicom-folder" if rng.random() < 0.8 else "dicom-file", folder if rng.random() < 0.8 else victim)
        made += 1
    for rows in (65535, 30000):  # declared 3 x rows x rows voxels > 2**31: refused from the headers
        folder = corpus.new_path("huge")
        folder.mkdir()
        for s in slices:
            ds = pydicom.dcmread(s)
            ds.Rows = ds.Columns = rows
            ds.save_as(folder / s.name, enforce_file_format=False)
        corpus.add("dicom-huge", folder, must_refuse=True)

    # folders with symlinks out, pipes, devices, loops and odd names
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(slices[0], outside / "stranger.dcm")
    specials = {
        "link-out-dicom": lambda f: (f / "x.dcm").symlink_to(outside / "stranger.dcm"),
        "link-out-etc": lambda f: (f / "passwd").symlink_to("/etc/passwd"),
        "link-devzero": lambda f: (f / "zero.dcm").symlink_to("/dev/zero"),
        "link-fifo": lambda f: (f / "fifo.dcm").symlink_to(fifo),
        "fifo-inside": lambda f: os.mkfifo(f / "pipe.dcm"),
        "dangling": lambda f: (f / "gone.dcm").symlink_to(f / "nowhere"),
        "loop": lambda f: ((f / "a.dcm").symlink_to(f / "b.dcm"), (f / "b.dcm").symlink_to(f / "a.dcm")),
        "dir-link-up": lambda f: (f / "up").symlink_to(f.parent, target_is_directory=True),
        "odd-names": lambda f: [shutil.copy(slices[0], f / n) for n in
                                ("-rf", "new\nline.dcm", "é中文.dcm", "x" * 250, " space ", "..dcm", "\\back")],
        "empty-file": lambda f: (f / "empty.dcm").write_bytes(b""),
        "only-dicm": lambda f: (f / "hdr.dcm").write_bytes(b"\0" * 128 + b"DICM"),
        "subfolder": lambda f: shutil.copytree(dicom_seed, f / "sub"),
    }
    for name, make in specials.items():
        for with_series in (True, False):
            folder = corpus.new_path(f"special-{name}")
            folder.mkdir()
            if with_series:
                for s in slices:
                    shutil.copy(s, folder / s.name)
            make(folder)
            corpus.add("special-folder", folder)
    for name, target in (("pipe.nii", fifo), ("zero.nii", Path("/dev/zero")), ("zero.nrrd", Path("/dev/zero")),
                         ("zero.dcm", Path("/dev/zero")), ("pipe.mha", fifo), ("gone.nii.gz", root / "nope")):
        path = corpus.new_path(name)
        path.symlink_to(target)
        corpus.add("special-file", path, must_refuse=True)
    path = corpus.new_path("real-fifo.nrrd")
    os.mkfifo(path)
    corpus.add("special-file", path, must_refuse=True)
    for name in ("empty.nii", "empty.nii.gz", "empty.nrrd", "empty.mha", "empty.dcm"):
        path = corpus.new_path(name)
        path.write_bytes(b"")
        corpus.add("empty", path, must_refuse=True)
    return corpus


# ---- running --------------------------------------------------------------------------------------------------


def _run_chunk(cases: list[str], workdir: Path, name: str) -> dict[int, str]:
    """Read every case in worker processes; {case index: result}, restarting after a crash or hang."""
    cases_file = workdir / f"{name}.json"
    cases_file.write_text(json.dumps(cases))
    worker = workdir / "worker.py"
    results: dict[int, str] = {}
    start = 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MEDMAMBA_MAX_VOXELS", None)
    while start < len(cases):
        log = workdir / f"{name}-{start}.log"
        log.write_text("")
        err_file = workdir / f"{name}-{start}.stderr"
        with open(err_file, "wb") as err:  # a file, not a pipe: a full pipe would block the worker
            proc = subprocess.Popen([sys.executable, str(worker), str(cases_file), str(log),
                                     str(ADDRESS_SPACE_LIMIT), str(start)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)
        last_progress, seen, current = time.monotonic(), 0, None
        hung = False
        while proc.poll() is None:
            time.sleep(0.05)
            lines = log.read_text().splitlines()
            if len(lines) > seen:
                seen, last_progress = len(lines), time.monotonic()
            elif current is not None and time.monotonic() - last_progress > PER_CASE_TIMEOUT_S:
                proc.kill()
                hung = True
            for line in lines[-2:]:
                entry = json.loads(line)
                current = entry[1] if entry[0] == "start" else None
        proc.wait()
        stderr = err_file.read_bytes()[-300:].decode(errors="replace")
        last_started = None
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry[0] == "start":
                last_started = entry[1]
            else:
                results[entry[1]] = entry[2]
                last_started = None
        if last_started is None:
            if proc.returncode != 0:  # died outside a case (import, rlimit): report on the next case
                results[start] = f"BAD worker exited {proc.returncode} before the case: {stderr}"
                start += 1
            else:
                break
            continue
        why = f"HANG > {PER_CASE_TIMEOUT_S} s" if hung else f"CRASH (exit {proc.returncode}) {stderr}"
        results[last_started] = f"BAD {why}"
        start = last_started + 1
    return results


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory, hippocampus: Path, dicom_series: Path):
    root = tmp_path_factory.mktemp("fuzz")
    t0 = time.perf_counter()
    (root / "corpus").mkdir()
    corpus = build_corpus(root / "corpus", hippocampus, dicom_series)
    built = time.perf_counter() - t0
    (root / "worker.py").write_text(WORKER)
    paths = [p for _, p in corpus.cases]
    halves = [list(range(0, len(paths), 2)), list(range(1, len(paths), 2))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_run_chunk, [paths[i] for i in half], root, f"w{k}") for k, half in enumerate(halves)]
        chunk_results = [f.result() for f in futures]
    results = {}
    for half, chunk in zip(halves, chunk_results):
        for j, result in chunk.items():
            results[half[j]] = result
    elapsed = time.perf_counter() - t0
    summary: dict[str, dict[str, int]] = {}
    for i, (kind, _) in enumerate(corpus.cases):
        outcome = results.get(i, "MISSING").split(" ")[0]
        summary.setdefault(kind, {}).setdefault(outcome, 0)
        summary[kind][outcome] += 1
    print(f"\nfuzz: {len(paths)} cases, corpus built in {built:.1f} s, total {elapsed:.1f} s; {summary}")
    return corpus, results, elapsed


def test_corpus_is_large_and_mixed(fuzz_results) -> None:
    corpus, results, _ = fuzz_results
    assert len(corpus.cases) >= MIN_CASES
    kinds = {kind for kind, _ in corpus.cases}
    assert {"nifti", "nifti2", "nrrd", "meta", "dicom-folder", "dicom-file", "special-folder"} <= kinds
    outcomes = [r.split(" ")[0] for r in results.values()]
    assert outcomes.count("refused") > 300 and outcomes.count("ok") > 50  # mutations both survive and fail


def test_every_hostile_file_ends_in_a_read_or_volume_read_error(fuzz_results) -> None:
    corpus, results, _ = fuzz_results
    bad = [f"{corpus.cases[i][0]} {corpus.cases[i][1]}: {results.get(i, 'MISSING (never run)')}"
           for i in range(len(corpus.cases)) if not results.get(i, "MISSING").startswith(("ok", "refused"))]
    assert not bad, f"{len(bad)} of {len(corpus.cases)} cases failed:\n" + "\n".join(bad[:40])


def test_huge_declared_sizes_are_refused_before_allocation(fuzz_results) -> None:
    """Read under RLIMIT_AS = 2 GiB: an allocation of the declared size would have failed differently."""
    corpus, results, _ = fuzz_results
    index = {path: i for i, (_, path) in enumerate(corpus.cases)}
    assert len(corpus.must_refuse) >= 30
    wrong = {path: results.get(index[path]) for path in corpus.must_refuse if results.get(index[path]) != "refused"}
    assert not wrong, wrong


def test_fuzzing_fits_in_ci_time(fuzz_results) -> None:
    *_, elapsed = fuzz_results
    assert elapsed < 90, f"fuzzing took {elapsed:.0f} s"
