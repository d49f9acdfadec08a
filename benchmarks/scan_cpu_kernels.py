"""Time the numba selective-scan kernels alone (no autograd, no copies): forward, forward saving the
checkpoints a backward needs, backward. For before/after comparisons in one process, ``--compare FILE``
loads another version of ``napari_medmamba/ssm/_cpu_numba.py`` (e.g. ``git show REV:napari_medmamba/ssm/_cpu_numba.py
> /tmp/old.py``) and times it on the same inputs.

    python benchmarks/scan_cpu_kernels.py --compare /tmp/old.py --shapes 1,32,262144,16 2,64,32768,16

Prints a markdown table: min wall ms of the repeats on all numba threads, and (fwd saving + bwd) / fwd.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from scan import make_inputs

from napari_medmamba.ssm import _cpu_numba
from napari_medmamba.ssm._scan_autograd import _time_major
from napari_medmamba.ssm.cpu import NumbaScanCore

DEFAULT_SHAPES = ["1,32,262144,16", "2,64,32768,16", "1,64,1048576,16", "1,128,131072,16"]


def load_module(path: str) -> ModuleType:
    """Import a copy of ``path`` from a temporary folder: numba's on-disk cache of the compared kernels then
    lives beside the copy and never mixes with the package's own (loading the package's file in place wrote
    cache entries that later imports of the package could not load)."""
    folder = Path(tempfile.mkdtemp(prefix="scan_kernels_compared_"))
    copy = folder / "scan_kernels_compared.py"
    shutil.copyfile(path, copy)
    spec = importlib.util.spec_from_file_location("scan_kernels_compared", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def time_kernels(mod: ModuleType, shape: tuple[int, int, int, int], repeats: int) -> dict[str, float]:
    """Min wall ms of forward, forward saving checkpoints and backward, on ``benchmarks/scan.py``'s inputs
    (a Mamba-block call: D, z, delta_bias, softplus) in the kernels' layouts."""
    b, d, length, _ = shape
    x = make_inputs(shape, torch.float32, "cpu", grad=False)
    u, delta, z, A, D, bias = (x[k].numpy() for k in ("u", "delta", "z", "A", "D", "delta_bias"))
    Bt_t = _time_major(x["B"], torch.float32)
    Bt, Ct = Bt_t.numpy(), _time_major(x["C"], torch.float32).numpy()
    dout = torch.randn(b, d, length, generator=torch.Generator().manual_seed(1)).numpy()
    core = NumbaScanCore()  # the work split the CPU backend uses for these shapes
    slices, bslices = core._slices_for(x["u"], Bt_t), core._backward_slices(x["u"], Bt_t)

    def fwd(save: bool):
        return mod.scan_forward(u, delta, A, Bt, Ct, D, z, bias, True, slices, mod.CHUNK, save)

    saved = fwd(True)[2]

    def bwd():
        return mod.scan_backward(u, delta, A, Bt, Ct, D, z, bias, True, bslices, mod.CHUNK, saved, dout, None)

    out = {}
    for key, fn in (("fwd", lambda: fwd(False)), ("fwd_save", lambda: fwd(True)), ("bwd", bwd)):
        fn()  # warm-up (and compilation)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[key] = 1e3 * min(times)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="B,D,L,N (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compare", help="another _cpu_numba.py to time first on the same inputs (label 'compared')")
    a = p.parse_args(argv)
    versions = ([("compared", load_module(a.compare))] if a.compare else []) + [("current", _cpu_numba)]
    print("| shape (B,D,L,N) | kernels | fwd ms | fwd saving ms | bwd ms | (fwd saving + bwd) / fwd |")
    print("|---|---|---|---|---|---|")
    for text in a.shapes:
        shape = tuple(int(v) for v in text.split(","))
        for label, mod in versions:
            r = time_kernels(mod, shape, a.repeats)  # type: ignore[arg-type]
            print(f"| ({text}) | {label} | {r['fwd']:.4g} | {r['fwd_save']:.4g} | {r['bwd']:.4g} | "
                  f"{(r['fwd_save'] + r['bwd']) / r['fwd']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
