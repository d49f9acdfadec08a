"""Loading and saving weights: one loader for official LightM-UNet / MHS-VM checkpoints and our own files.

``load_checkpoint(path)`` reads

* official LightM-UNet nnU-Net v2 checkpoints (``checkpoint_final.pth``: a dict with ``network_weights``,
  ``trainer_name``, ``init_args`` ...); the network is built as the trainer builds it (dimensionality from
  the configuration's patch size, input channels from ``dataset_json``, classes from its labels);
* official MHS-VM ``.pth`` files (a ``VMUNet`` state dict, possibly ``module.``-prefixed or inside a
  training checkpoint's ``model_state_dict``; the alias entries ``x_ssproj_W`` and
  ``scanning.seq2seq_engine.*`` are checked against the tensors they repeat and dropped);
* our own ``.safetensors`` files written by :func:`save_weights` (architecture and config in the metadata).

Pickle-based files are read with ``torch.load(weights_only=True)``; only plain numpy data types
(scalars, dtypes, arrays) are allow-listed on top of torch's defaults, so no code in a file can run.
Keys are matched strictly; every failure raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .lightm_unet import LightMUNet
from .mhs_vm import MHSVM
from .zoo import ARCHITECTURES, build_model

__all__ = ["CheckpointError", "load_checkpoint", "save_weights", "read_state_dict"]

FORMAT = "napari-medmamba"
MHS_VM_DEFAULT_GFU_T = 0.4
"""Gate threshold used for official MHS-VM files (not stored in them; the official test script uses 0.4)."""


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _numpy_safe_globals() -> list[Any]:
    """Plain numpy data types that official checkpoints carry in ``init_args``/``logging``."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    out: list[Any] = [np.dtype, np.ndarray, scalar, _reconstruct,
                      (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                      (_reconstruct, "numpy.core.multiarray._reconstruct"),
                      (_reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "StringDType"]
    return out


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError from bad zips, ...
        raise CheckpointError(path, f"not a loadable checkpoint (read with weights_only=True): "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _is_pickle_or_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a weights file and what is known about it (``kind`` plus format-specific info)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if not _is_pickle_or_zip(path):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(path, f"not a checkpoint (neither a torch file nor safetensors): {e}") from e
        return sd, {"kind": "safetensors", "metadata": meta}
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and "network_weights" in obj:
        return _tensors(obj["network_weights"], path), {"kind": "nnunet", "trainer_name": obj.get("trainer_name"),
                                                        "init_args": obj.get("init_args")}
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _tensors(obj, path), {"kind": "state_dict"}
    raise CheckpointError(path, "not a checkpoint: no state dict, 'network_weights' or 'model_state_dict' found")


def _tensors(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(path, "not a checkpoint: the weights entry is not a name -> tensor mapping")
    return dict(sd)


# ---- official LightM-UNet (nnU-Net v2) ---------------------------------------------------------

def _nnunet_network_args(init_args: Any, path: Path) -> dict[str, int] | None:
    """spatial_dims, in_channels, out_channels the trainer derives from its plans and dataset.json."""
    if not isinstance(init_args, Mapping) or not {"plans", "configuration", "dataset_json"} <= set(init_args):
        return None
    try:
        configs = init_args["plans"]["configurations"]
        cfg = dict(configs[init_args["configuration"]])
        parent = cfg.get("inherits_from")
        while parent:  # nnU-Net configurations may inherit from another one
            base = dict(configs[parent])
            parent = base.pop("inherits_from", None)
            cfg = {**base, **{k: v for k, v in cfg.items() if k != "inherits_from"}}
        ds = init_args["dataset_json"]
        channels = ds["modality"] if "modality" in ds else ds["channel_names"]
        labels = {k: v for k, v in ds["labels"].items() if k != "ignore"}
        regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
        if regions:
            n_out = sum(1 for k, v in labels.items() if k != "background" and any(int(i) for i in _as_list(v)))
        else:
            n_out = len({int(i) for v in labels.values() for i in _as_list(v)})
        n_in = len(channels)
        if cfg.get("previous_stage"):  # cascade: one extra input per foreground label
            n_in += len({int(i) for v in labels.values() for i in _as_list(v)} - {0})
        return {"spatial_dims": len(cfg["patch_size"]), "in_channels": n_in, "out_channels": n_out}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"malformed nnU-Net init_args ({type(e).__name__}: {e})") from e


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _lightm_from_weights(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    try:
        w_in, w_init = sd["convInit.0.conv.weight"], sd["convInit.1.conv.weight"]
        w_out = sd["conv_final.2.1.conv.weight"]
    except KeyError as e:
        raise CheckpointError(path, f"unknown architecture: no LightM-UNet key {e}") from None
    n_down = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down_layers\.(\d+)\.", k)))
    # down_layers.i = Sequential(downsampling layer or Identity, ResMambaBlock x n): highest index is n
    blocks_down = [max(int(m.group(1)) for k in sd if (m := re.match(rf"down_layers\.{i}\.(\d+)\.", k)))
                   for i in range(n_down)]
    blocks_up = [1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"up_layers\.{i}\.(\d+)\.", k)))
                 for i in range(n_down - 1)]
    return {"spatial_dims": w_in.dim() - 2, "in_channels": w_in.shape[0], "init_filters": w_init.shape[0],
            "out_channels": w_out.shape[0], "blocks_down": blocks_down, "blocks_up": blocks_up}


def _nnunet_model(sd: Mapping[str, torch.Tensor], info: Mapping[str, Any], path: Path) -> nn.Module:
    trainer = info.get("trainer_name") or ""
    if "LightMUNet" not in str(trainer):
        raise CheckpointError(path, f"unknown architecture: nnU-Net trainer {trainer!r} "
                                    "(supported: nnUNetTrainerLightMUNet)")
    found = _lightm_from_weights(sd, path)
    planned = _nnunet_network_args(info.get("init_args"), path)
    if planned is not None:
        diff = {k: (v, found[k]) for k, v in planned.items() if found[k] != v}
        if diff:
            raise CheckpointError(path, "init_args disagree with network_weights (planned, stored): "
                                  + ", ".join(f"{k}={a}/{b}" for k, (a, b) in diff.items()))
    # nnUNetTrainerLightMUNet.build_network_architecture: init_filters 32, blocks (1,2,2,4)/(1,1,1).
    return LightMUNet(spatial_dims=found["spatial_dims"], init_filters=32, in_channels=found["in_channels"],
                      out_channels=found["out_channels"], blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


# ---- official MHS-VM -----------------------------------------------------------------------------

_PREFIXES = ("module.", "vmunet.")


def _mhs_vm_canonical(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Strip ``module.``/``vmunet.`` prefixes and fold the alias entries into the tensors they repeat."""
    stripped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        stripped[k] = v
    out, aliases = {}, {}
    for k, v in stripped.items():
        canon = k.replace(".scanning.seq2seq_engine.", ".mambaeng.")
        canon = re.sub(r"\.x_ssproj_W$", ".x_ssproj.weight", canon)
        (aliases if canon != k else out)[canon if canon != k else k] = v
    for k, v in aliases.items():
        if k in out and not (out[k].shape == v.shape and torch.equal(out[k], v)):
            raise CheckpointError(path, f"alias entry of {k!r} differs from the tensor it should repeat")
        out.setdefault(k, v)
    return out


def _mhs_vm_from_weights(sd: Mapping[str, torch.Tensor], path: Path) -> MHSVM:
    def count(pattern: str) -> int:
        idx = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
        return 1 + max(idx) if idx else 0

    n = count(r"layers\.(\d+)\.")
    if n == 0 or "patch_embed.proj.weight" not in sd:
        raise CheckpointError(path, "unknown architecture: neither LightM-UNet nor MHS-VM keys found")
    dims = [sd[f"layers.{i}.blocks.0.ln_1.weight"].shape[0] for i in range(n)]
    block0 = "layers.0.blocks.0.self_attention.mhs."
    heads = sum(1 for p in "CXSZ" if f"{block0}scanhead_{p}.mambaeng.Ds" in sd)
    return MHSVM(in_chans=sd["patch_embed.proj.weight"].shape[1], num_classes=sd["final_conv.weight"].shape[0],
                 depths=[count(rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(n)],
                 depths_decoder=[count(rf"layers_up\.{i}\.blocks\.(\d+)\.") for i in range(n)],
                 dims=dims, d_state=sd[f"{block0}scanhead_C.mambaeng.A_logs"].shape[1], head_num=heads,
                 gfu_t=MHS_VM_DEFAULT_GFU_T, with_proj=f"{block0}y_proj.weight" in sd,
                 patch_size=sd["patch_embed.proj.weight"].shape[-1])


# ---- loading -------------------------------------------------------------------------------------

def _load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]

    def show(items: list[str]) -> str:
        return ", ".join(items[:20]) + (f" ... ({len(items)} in all)" if len(items) > 20 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {show(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {show(shapes)}")
    if problems:
        raise CheckpointError(path, f"does not fit {type(model).__name__}; " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model


def load_checkpoint(path: str | Path, model: nn.Module | None = None, name: str | None = None) -> nn.Module:
    """Load a weights file into ``model``, or into the registered model ``name`` (at the widths our safetensors
    metadata gives, if it names the same network), or into a network built
    from what the file says (nnU-Net trainer/plans, MHS-VM key shapes, our safetensors metadata).

    Returns the model on CPU in eval mode. Raises :class:`CheckpointError` (naming the file) for files that
    are not checkpoints or not safe to read, unknown architectures, and missing/unexpected keys or shape
    mismatches (all listed).
    """
    path = Path(path)
    sd, info = read_state_dict(path)
    kind = info["kind"]
    is_mhs = kind != "safetensors" and any(
        k.split("vmunet.", 1)[-1].startswith("patch_embed.") or ".scanning.seq2seq_engine." in k for k in sd)
    if is_mhs:
        sd = _mhs_vm_canonical(sd, path)
    if model is None and name is not None:
        model = build_model(name)
        if kind == "safetensors" and info["metadata"].get("arch") == type(model).__name__:
            model = _from_metadata(info["metadata"], path)  # the registered network at the file's own widths
    if model is None:
        if kind == "nnunet":
            model = _nnunet_model(sd, info, path)
        elif kind == "safetensors":
            model = _from_metadata(info["metadata"], path)
        elif is_mhs:
            model = _mhs_vm_from_weights(sd, path)
        elif "convInit.0.conv.weight" in sd:
            model = LightMUNet(**_lightm_from_weights(sd, path))
        else:
            raise CheckpointError(path, "unknown architecture: neither LightM-UNet nor MHS-VM keys found")
    model = _load_strict(model, sd, path)
    return model.cpu().eval()


def _from_metadata(meta: Mapping[str, str], path: Path) -> nn.Module:
    if meta.get("format") != FORMAT or "arch" not in meta:
        raise CheckpointError(path, "safetensors file without napari-medmamba metadata; pass model= or name=")
    arch = ARCHITECTURES.get(meta["arch"])
    if arch is None:
        raise CheckpointError(path, f"unknown architecture {meta['arch']!r} (known: {', '.join(ARCHITECTURES)})")
    try:
        return arch(**json.loads(meta.get("config", "{}")))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad architecture config in metadata: {e}") from e


def save_weights(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors, with its architecture, config and ``metadata``
    (values that are not strings are stored as JSON)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = FORMAT
    name = type(model).__name__
    if name in ARCHITECTURES and hasattr(model, "arch_config"):
        meta["arch"] = name
        meta["config"] = json.dumps(model.arch_config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path
