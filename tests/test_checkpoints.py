"""load_checkpoint / save_weights: official nnU-Net and MHS-VM formats, safetensors, and refusals."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medmamba.models import CheckpointError, load_checkpoint, save_weights
from napari_medmamba.models.lightm_unet import LightMUNet
from napari_medmamba.models.mhs_vm import MHSVM

LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def _nnunet_dict(model: LightMUNet, patch: list, labels: dict = LABELS, **extra) -> dict:
    plans = {"dataset_name": "Dataset004_Hippocampus", "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
             "configurations": {
                 "3d_fullres": {"patch_size": patch, "spacing": [np.float64(1.0)] * 3, "batch_size": np.int64(9)},
                 "2d": {"patch_size": [56, 40], "spacing": [1.0, 1.0]},
                 "3d_alias": {"inherits_from": "3d_fullres", "batch_size": 2}}}
    init_args = {"plans": plans, "configuration": "3d_fullres" if len(patch) == 3 else "2d", "fold": 0,
                 "dataset_json": {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 260,
                                  "file_ending": ".nii.gz"},
                 "unpack_dataset": True, "device": torch.device("cuda")}
    out = {"network_weights": model.state_dict(), "optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                                                      "param_groups": [{"lr": 1e-4}]},
           "grad_scaler_state": None,
           "logging": {"ema_fg_dice": [np.float64(0.5), np.float32(0.7)], "dtype": np.dtype("float32"),
                       "arr": np.arange(3)},
           "_best_ema": np.float64(0.7), "current_epoch": 1000, "init_args": init_args,
           "trainer_name": "nnUNetTrainerLightMUNet", "inference_allowed_mirroring_axes": (0, 1, 2)}
    out.update(extra)
    return out


def _same_output(a: torch.nn.Module, b: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_nnunet_lightm_3d(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = LightMUNet(spatial_dims=3, init_filters=32, in_channels=1, out_channels=3)
    path = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_dict(src, [40, 56, 40]), path)
    model = load_checkpoint(path)
    assert isinstance(model, LightMUNet) and not model.training
    assert model.arch_config["spatial_dims"] == 3 and model.arch_config["out_channels"] == 3
    _same_output(src, model, (1, 1, 8, 8, 8))


def test_nnunet_lightm_2d_modality_key_and_registry_name(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = LightMUNet(spatial_dims=2, init_filters=32, in_channels=1, out_channels=3)
    ck = _nnunet_dict(src, [56, 40])
    ck["init_args"]["dataset_json"] = {"modality": {"0": "MRI"}, "labels": LABELS}
    torch.save(ck, tmp_path / "c.pth")
    _same_output(src, load_checkpoint(tmp_path / "c.pth"), (1, 1, 8, 8))
    _same_output(src, load_checkpoint(tmp_path / "c.pth", name="lightm_unet_2d"), (1, 1, 8, 8))


def test_nnunet_refusals(tmp_path: Path) -> None:
    src = LightMUNet(spatial_dims=2, init_filters=32, in_channels=1, out_channels=3)
    torch.save(_nnunet_dict(src, [56, 40], trainer_name="nnUNetTrainer"), tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"a\.pth.*unknown architecture.*nnUNetTrainer"):
        load_checkpoint(tmp_path / "a.pth")
    four = {**LABELS, "tail": 3}
    torch.save(_nnunet_dict(src, [56, 40], labels=four), tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="out_channels=4/3"):
        load_checkpoint(tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"b\.pth.*shape mismatches: conv_final\.2\.1\.conv\.weight"):
        load_checkpoint(tmp_path / "b.pth", model=LightMUNet(spatial_dims=2, init_filters=32, out_channels=4))
    sd = src.state_dict()
    sd.pop("down_layers.0.1.norm1.weight")
    sd["extra.weight"] = torch.zeros(1)
    ck = _nnunet_dict(src, [56, 40])
    ck["network_weights"] = sd
    torch.save(ck, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: down_layers\.0\.1\.norm1\.weight.*"
                                              r"unexpected keys: extra\.weight"):
        load_checkpoint(tmp_path / "c.pth")


def _official_mhs_vm(model: MHSVM, prefix: str = "module.vmunet.") -> dict:
    """Our state dict in the official VMUNet layout: prefixed, with the alias entries it stores."""
    out = {}
    for k, v in model.state_dict().items():
        out[prefix + k] = v.clone()
        if k.endswith("mhs.x_ssproj.weight"):
            out[prefix + k.replace("x_ssproj.weight", "x_ssproj_W")] = v.clone()
        if ".mambaeng." in k:
            out[prefix + k.replace(".mambaeng.", ".scanning.seq2seq_engine.")] = v.clone()
    return out


@pytest.mark.parametrize("heads", [3, 4])
def test_official_mhs_vm(tmp_path: Path, heads: int) -> None:
    torch.manual_seed(heads)
    src = MHSVM(in_chans=3, num_classes=1, dims=(12 * heads, 24 * heads), depths=(1, 2), depths_decoder=(2, 1),
                head_num=heads, gfu_t=0.4)
    sd = _official_mhs_vm(src)
    assert len(sd) > len(src.state_dict())
    torch.save(sd, tmp_path / "best.pth")
    model = load_checkpoint(tmp_path / "best.pth")
    assert model.arch_config["head_num"] == heads and model.arch_config["depths"] == [1, 2]
    _same_output(src, model, (1, 1, 16, 32))
    torch.save({"model_state_dict": _official_mhs_vm(src, "vmunet."), "epoch": 3}, tmp_path / "latest.pth")
    _same_output(src, load_checkpoint(tmp_path / "latest.pth"), (1, 3, 16, 16))


def test_mhs_vm_alias_disagreement(tmp_path: Path) -> None:
    src = MHSVM(in_chans=3, num_classes=2, dims=(8, 16), depths=(1, 1), depths_decoder=(1, 1), head_num=2)
    sd = _official_mhs_vm(src)
    k = next(k for k in sd if k.endswith("x_ssproj_W"))
    sd[k] = sd[k] + 1
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="alias"):
        load_checkpoint(tmp_path / "bad.pth")


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    from safetensors import safe_open

    torch.manual_seed(2)
    src = MHSVM(in_chans=1, num_classes=3, dims=(8, 16), depths=(1, 1), depths_decoder=(1, 1), head_num=2)
    path = save_weights(src, tmp_path / "w.safetensors", {"dataset": "hippocampus", "epochs": 3})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["dataset"] == "hippocampus" and meta["epochs"] == "3" and meta["arch"] == "MHSVM"
    _same_output(src, load_checkpoint(path), (1, 1, 16, 16))
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without napari-medmamba metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_malicious_pickle_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    torch.save({"network_weights": {}, "payload": _Evil(marker)}, tmp_path / "evil.pth")
    torch.save(_Evil(marker), tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match=rf"{name}.*weights_only"):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"hello world, not weights")
    with pytest.raises(CheckpointError, match=r"junk\.bin.*not a checkpoint"):
        load_checkpoint(tmp_path / "junk.bin")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth.*not a checkpoint"):
        load_checkpoint(tmp_path / "list.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
