"""Weights shipped in the package: location, sha256 verification, loading for a registered model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.nn as nn

from .checkpoints import CheckpointError, load_checkpoint
from .registry import WEIGHTS_DIR, ModelSpec, get_model_spec

__all__ = ["WEIGHTS_DIR", "WeightsIntegrityError", "sha256_file", "weights_path", "load_registered_model"]

class WeightsIntegrityError(CheckpointError):
    """A shipped weights file is missing or its sha256 differs from the registry's."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_path(spec: ModelSpec) -> Path | None:
    """Where ``spec``'s shipped weights live, or None for a model without shipped weights."""
    return WEIGHTS_DIR / spec.weights if spec.weights else None


def load_registered_model(model: str | ModelSpec, verify: bool = True) -> nn.Module:
    """The registered network with its shipped weights loaded, after checking their sha256.

    Raises :class:`WeightsIntegrityError` when the file is missing or altered, and
    ``ValueError`` for a model that ships no weights.
    """
    spec = get_model_spec(model) if isinstance(model, str) else model
    path = weights_path(spec)
    if path is None:
        raise ValueError(f"model {spec.name!r} ships no trained weights")
    if not path.is_file():
        raise WeightsIntegrityError(path, f"shipped weights of model {spec.name!r} are missing; reinstall napari-medmamba")
    if verify:
        if not spec.sha256:
            raise WeightsIntegrityError(path, f"the registry has no sha256 for model {spec.name!r}; refusing to load")
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise WeightsIntegrityError(
                path, f"sha256 {actual} does not match the registry's {spec.sha256} for model {spec.name!r}; "
                "the file is corrupt or was replaced: reinstall napari-medmamba"
            )
    return load_checkpoint(path, name=spec.name)
