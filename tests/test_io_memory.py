"""Reading a large scan must not hold several copies of it in memory at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHAPE = (600, 512, 512)  # z, y, x: a long CT, 315 MB as int16

# VmHWM (peak resident memory) restarts at exec, unlike ru_maxrss, which a child inherits
# from the (possibly large) pytest process; so the child reads it from /proc.
CHILD = r"""
import json, sys

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

from napari_medmamba.io import read_volume
before = peak_kib()
volume = read_volume(sys.argv[1])
print(json.dumps({"peak_bytes": (peak_kib() - before) * 1024, "nbytes": volume.array.nbytes,
                  "shape": list(volume.shape), "checksum": int(volume.array[::37, ::41, ::43].sum())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
# NRRD/MetaImage pixels are read straight into the buffer the array shares (about 1x);
# ITK's NIfTI reader decodes into a buffer of its own first and copies (about 2x).
@pytest.mark.parametrize(("ext", "limit"), [(".nrrd", 1.5), (".nii", 3.0)])
def test_reading_keeps_peak_memory_under_three_times_the_array(tmp_path: Path, ext: str, limit: float) -> None:
    array = np.full(SHAPE, -1000, np.int16)
    array[:, 100:400, 50:450] = np.arange(400, dtype=np.int16)  # touch every page with non-trivial data
    image = sitk.GetImageFromArray(array)
    path = tmp_path / f"big{ext}"
    sitk.WriteImage(image, str(path), useCompression=False)  # uncompressed: fast to write
    expected_checksum = int(array[::37, ::41, ::43].sum())
    del image, array

    try:
        result = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    finally:
        path.unlink()  # 315 MB: do not leave it in pytest's kept temporary folders
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == list(SHAPE) and report["checksum"] == expected_checksum
    ratio = report["peak_bytes"] / report["nbytes"]
    assert ratio > 0.9, "the measurement did not see the array at all"
    assert ratio < limit, f"peak {ratio:.2f}x the array size"
