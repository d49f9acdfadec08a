"""Where fine-tuned models live on the user's machine: save, list, load (register), remove, clear.

One folder per user (``$MEDMAMBA_MODELS_DIR`` overrides it), created owner-only (0o700); every file in it is
written atomically with owner-only permissions (0o600). Each model is two files: ``NAME.safetensors`` (weights
only: no image data) and ``NAME.json`` (its card: base model and its sha256, a data fingerprint, before/after
Dice; no paths, no identifiers). Loading checks the weights' sha256 against the card.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ..atomic_write import atomic_write
from ..models.checkpoints import CheckpointError, load_checkpoint, save_weights
from ..models.registry import REGISTRY, ModelSpec, get_model_spec, register
from ..models.shipped import sha256_file
from ..user_dirs import user_folder

__all__ = ["MODELS_ENV", "StoredModel", "default_model_store", "save_finetuned", "list_finetuned", "load_finetuned",
           "register_stored", "remove_finetuned", "clear_finetuned"]

MODELS_ENV = "MEDMAMBA_MODELS_DIR"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


@dataclass(frozen=True)
class StoredModel:
    """A fine-tuned model in the store."""

    name: str
    weights: Path
    card_path: Path
    card: dict

    @property
    def base_model(self) -> str:
        return str(self.card.get("base_model", ""))


def default_model_store() -> Path:
    """The per-user folder of fine-tuned models (``$MEDMAMBA_MODELS_DIR`` overrides it)."""
    return user_folder("data", "finetuned", MODELS_ENV)


def _folder(store: str | PathLike[str] | None, create: bool = False) -> Path:
    folder = Path(store).expanduser() if store is not None else default_model_store()
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    return folder


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 121 characters)")
    return name


def save_finetuned(model, card: dict, name: str | None = None, store: str | PathLike[str] | None = None) -> StoredModel:
    """Write ``model``'s weights and ``card`` to the store (owner-only files); returns the stored entry.

    ``card`` must name its ``base_model``; ``weights_file`` and ``weights_sha256`` are filled in here.
    """
    import tempfile

    name = _check_name(name or str(card.get("model_name", "")))
    if not card.get("base_model"):
        raise ValueError("the card must name its base_model")
    folder = _folder(store, create=True)
    weights = folder / f"{name}.safetensors"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # safetensors writes in place: write, then move atomically
        tmp_file = save_weights(model, Path(tmp) / weights.name, {
            "model_name": name, "base_model": card["base_model"],
            "base_weights_sha256": card.get("base_weights_sha256") or "",
            "data_fingerprint": card.get("data_fingerprint", ""), "intended_use": card.get("intended_use", "")})
        atomic_write(weights, tmp_file.read_bytes(), mode=0o600)
    card = {**card, "model_name": name, "weights_file": weights.name, "weights_sha256": sha256_file(weights)}
    card_path = folder / f"{name}.json"
    atomic_write(card_path, (json.dumps(card, indent=1) + "\n").encode(), mode=0o600)
    return StoredModel(name, weights, card_path, card)


def list_finetuned(store: str | PathLike[str] | None = None) -> list[StoredModel]:
    """The fine-tuned models in the store, sorted by name (cards that cannot be read are skipped)."""
    folder = _folder(store)
    if not folder.is_dir():
        return []
    out = []
    for card_path in sorted(folder.glob("*.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            continue
        weights = folder / f"{card_path.stem}.safetensors"
        if isinstance(card, dict) and card.get("finetuned") and weights.is_file():
            out.append(StoredModel(card_path.stem, weights, card_path, card))
    return out


def _find(name: str, store: str | PathLike[str] | None) -> StoredModel:
    for m in list_finetuned(store):
        if m.name == name:
            return m
    raise KeyError(f"no fine-tuned model {name!r} in {_folder(store)}")


def load_finetuned(name: str, store: str | PathLike[str] | None = None, register_it: bool = True) -> ModelSpec:
    """The stored fine-tuned model ``name`` as a spec (base model's contract; weights sha256-checked), added
    to the registry when ``register_it`` (an already registered model of that name is returned as is)."""
    if register_it and name in REGISTRY:
        return REGISTRY[name]
    entry = _find(name, store)
    base = get_model_spec(entry.base_model)
    actual = sha256_file(entry.weights)
    if actual != entry.card.get("weights_sha256"):
        raise CheckpointError(entry.weights, f"sha256 {actual} does not match its card's {entry.card.get('weights_sha256')}")
    weights = entry.weights

    widened = bool(entry.card.get("new_labels"))

    def factory():
        if widened:  # a widened head: architecture and config come from the file's own metadata
            return load_checkpoint(weights)
        return load_checkpoint(weights, name=base.name)

    factory()  # fail now (wrong architecture, missing keys) rather than at the first segmentation
    contract = base.contract
    names, colors = entry.card.get("labels"), entry.card.get("label_colors")
    if names and list(names) != list(contract.label_names):  # fine-tuned with new structures
        if not colors or len(colors) != len(names):
            raise CheckpointError(entry.weights, "its card lists new labels without one colour per label")
        contract = dataclasses.replace(contract, label_names=tuple(names), label_colors=tuple(colors))
    contract = dataclasses.replace(contract, pad_to_patch=False)  # fine-tuning trains on tiles capped to the volume
    spec = ModelSpec(name=name, factory=factory, contract=contract,
                     description=f"{base.name} fine-tuned ({entry.card.get('mode', '?')}, {entry.card.get('steps', '?')} steps)",
                     card=entry.card)
    return register(spec) if register_it else spec


def register_stored(store: str | PathLike[str] | None = None) -> list[str]:
    """Register every loadable model of the store (skipping those whose base model is unknown or whose
    weights fail their check); returns the registered names."""
    names = []
    for m in list_finetuned(store):
        try:
            names.append(load_finetuned(m.name, store).name)
        except (KeyError, CheckpointError, ValueError):
            continue
    return names


def remove_finetuned(name: str, store: str | PathLike[str] | None = None) -> None:
    """Delete a stored fine-tuned model (both files) and drop it from the registry."""
    entry = _find(name, store)
    entry.weights.unlink(missing_ok=True)
    entry.card_path.unlink(missing_ok=True)
    spec = REGISTRY.get(name)
    if spec is not None and spec.card.get("finetuned"):
        del REGISTRY[name]


def clear_finetuned(store: str | PathLike[str] | None = None) -> int:
    """Delete every fine-tuned model of the store; returns how many were removed."""
    models = list_finetuned(store)
    for m in models:
        remove_finetuned(m.name, store)
    return len(models)
