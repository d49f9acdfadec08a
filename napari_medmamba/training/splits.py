"""Fixed train/validation splits: drawn once with a seed, stored as JSON, never trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["make_split", "save_split", "load_split", "DEFAULT_SPLIT"]

DEFAULT_SPLIT = Path(__file__).resolve().parents[2] / "weights" / "splits" / "msd_hippocampus.json"
"""The MSD Task04 hippocampus split shipped with the repository (44 of 220 cases for validation)."""


def make_split(case_ids: Iterable[str], n_val: int, seed: int = 0, dataset: str = "") -> dict:
    """Draw ``n_val`` validation ids uniformly without replacement from the sorted ``case_ids``.

    Uses ``numpy.random.default_rng(seed).choice(sorted_ids, n_val, replace=False)``; both lists are sorted.
    """
    ids = sorted(set(case_ids))
    if not 0 < n_val < len(ids):
        raise ValueError(f"n_val must be between 1 and {len(ids) - 1}, got {n_val}")
    val = sorted(str(i) for i in np.random.default_rng(seed).choice(ids, size=n_val, replace=False))
    train = [i for i in ids if i not in set(val)]
    return {"dataset": dataset, "seed": seed, "n_cases": len(ids), "n_val": n_val,
            "method": f"numpy.random.default_rng({seed}).choice(sorted(case_ids), {n_val}, replace=False), "
                      "sorted; train = all other cases",
            "train": train, "val": val}


def save_split(split: dict, path: str | Path) -> Path:
    """Write ``split`` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return path


def load_split(path: str | Path = DEFAULT_SPLIT) -> dict:
    """Read a split JSON; checks that ``train`` and ``val`` exist and do not overlap."""
    split = json.loads(Path(path).read_text())
    if not isinstance(split.get("train"), list) or not isinstance(split.get("val"), list):
        raise ValueError(f"{path}: a split needs 'train' and 'val' lists of case ids")
    overlap = set(split["train"]) & set(split["val"])
    if overlap:
        raise ValueError(f"{path}: cases in both train and val: {sorted(overlap)[:5]}")
    return split
