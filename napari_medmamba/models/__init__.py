"""Networks (LightM-UNet, MHS-VM, a U-Net baseline), the Mamba block, the registry and checkpoint loading."""

from .registry import REGISTRY, InputContract, ModelSpec, get_model_spec, list_models, register
from .zoo import ARCHITECTURES, DEFAULT_MODEL, build_model, default_model_name
from .checkpoints import CheckpointError, load_checkpoint, save_weights
from .shipped import WEIGHTS_DIR, WeightsIntegrityError, load_registered_model, sha256_file, weights_path

__all__ = ["InputContract", "ModelSpec", "REGISTRY", "get_model_spec", "list_models", "register",
           "ARCHITECTURES", "DEFAULT_MODEL", "build_model", "default_model_name", "CheckpointError", "load_checkpoint", "save_weights",
           "WEIGHTS_DIR", "WeightsIntegrityError", "load_registered_model", "sha256_file", "weights_path"]
