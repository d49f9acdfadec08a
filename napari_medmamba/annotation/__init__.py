"""Correction loop core (Qt-free): undo/redo, edit log, correction tools, autosave."""

from .autosave import AutosaveError, AutosaveSession, RecoveryInfo, find_recovery
from .edit_log import EDIT_KINDS, Edit, EditLog, EditLogError
from .history import LabelHistory
from .tools import interpolate_label, next_slice_to_review, scribble_refine, slab

__all__ = [
    "EDIT_KINDS",
    "AutosaveError",
    "AutosaveSession",
    "Edit",
    "EditLog",
    "EditLogError",
    "LabelHistory",
    "RecoveryInfo",
    "find_recovery",
    "interpolate_label",
    "next_slice_to_review",
    "scribble_refine",
    "slab",
]
