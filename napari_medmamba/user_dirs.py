"""Per-user folders (Qt-free): where autosaves (a cache) and fine-tuned models (data) are kept."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

__all__ = ["user_folder"]


def user_folder(kind: Literal["cache", "data"], name: str, override_env: str) -> Path:
    """``<platform base>/napari-medmamba/<name>``, or ``$<override_env>`` when it is set.

    Bases: Linux ``$XDG_CACHE_HOME`` / ``$XDG_DATA_HOME`` (default ``~/.cache`` / ``~/.local/share``); macOS
    ``~/Library/Caches`` / ``~/Library/Application Support``; Windows ``%LOCALAPPDATA%`` for both.
    """
    override = os.environ.get(override_env)
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / ("Caches" if kind == "cache" else "Application Support")
    elif kind == "cache":
        base = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "napari-medmamba" / name
