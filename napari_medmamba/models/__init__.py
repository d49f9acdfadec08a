"""Networks (LightM-UNet, MHS-VM), the Mamba block, the registry and checkpoint loading."""

from .registry import InputContract, ModelSpec, get_model_spec, list_models, register

__all__ = ["InputContract", "ModelSpec", "get_model_spec", "list_models", "register"]
