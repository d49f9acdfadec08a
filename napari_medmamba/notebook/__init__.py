"""Jupyter notebook viewer and correction widget (Qt-free; needs ``napari-medmamba[notebook]``).

- :func:`view` shows a volume and its labels in three orthogonal planes (a 2D-canvas
  anywidget, no WebGL), with window/level presets, a label overlay and legend, a cursor
  readout in LPS millimetres, and a brush / eraser with undo whose edits go through
  :class:`~napari_medmamba.annotation.LabelHistory` into the numpy label map and its edit log.
- :func:`segment_and_view` segments a scan and views the result in one line.
- :func:`open_in_napari` opens a volume and labels in a napari window (needs a display).

anywidget / ipywidgets and napari are imported only when these functions are called.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..annotation import EditLog
from ..io import Volume, read_volume

__all__ = ["INSTALL_HINT", "NotebookDependencyError", "view", "segment_and_view", "open_in_napari"]

from ._widget import INSTALL_HINT, NotebookDependencyError

DEFAULT_MODEL = "lightm_unet_3d"


def _as_volume(volume: Volume | np.ndarray | str | os.PathLike[str]) -> Volume:
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        return read_volume(Path(volume))
    array = np.asarray(volume)
    from ..io import Geometry

    return Volume(array=array, geometry=Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))


def view(
    volume: Volume | np.ndarray | str | os.PathLike[str],
    labels: np.ndarray | Volume | None = None,
    label_names: Any = None,
    label_colors: Any = None,
    edit_log: EditLog | None = None,
    **options: Any,
) -> Any:
    """An interactive notebook widget for ``volume`` (a :class:`Volume`, a path, or a (z, y, x) array).

    ``labels``: an integer (z, y, x) label map (edited in place when it is writable and
    C-contiguous, else copied; an empty map when None). ``label_names`` / ``label_colors``:
    sequences indexed by label value or dicts ``{value: name}`` / ``{value: "#rrggbb"}``.
    ``edit_log``: an :class:`EditLog` to continue. ``options`` set widget traits, e.g.
    ``opacity=0.4``, ``tool="brush"``, ``brush_radius=3``, ``display_size=360``.

    The widget's ``labels`` is the numpy array, ``history`` the
    :class:`~napari_medmamba.annotation.LabelHistory` (``widget.history.undo()``),
    ``edit_log`` the edit log. Only the three visible slices are sent to the browser.
    ``widget.correction_example()`` packs scan + labels + edit log for
    :func:`~napari_medmamba.training.finetune.finetune`; ``widget.resegment(model)`` re-runs a model
    (e.g. the fine-tuned one) as one undoable step that keeps the reviewed / edited voxels.
    """
    from ._widget import make_viewer

    return make_viewer(_as_volume(volume), labels, label_names, label_colors, edit_log, **options)


def segment_and_view(
    path_or_volume: Volume | np.ndarray | str | os.PathLike[str],
    model: Any = None,
    device: str = "auto",
    mode: str = "accurate",
    progress: Callable[[float, str], None] | None = None,
    **view_options: Any,
) -> Any:
    """Segment a scan (default model ``lightm_unet_3d``) and return :func:`view` of the result.

    The segmentation result is kept as ``widget.result`` (uncertainty, timings, warnings).
    """
    from ..inference import segment

    volume = _as_volume(path_or_volume)
    result = segment(volume, model or DEFAULT_MODEL, device=device, mode=mode, progress=progress)
    labels = np.ascontiguousarray(result.labels.array).copy()
    widget = view(volume, labels, label_names=list(result.label_names), label_colors=list(result.label_colors),
                  **view_options)
    widget.result = result
    return widget


def _has_display() -> bool:
    if sys.platform.startswith("linux"):
        platform = os.environ.get("QT_QPA_PLATFORM", "")
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or platform in {"offscreen", "minimal"})
    return True


def open_in_napari(
    volume: Volume | np.ndarray | str | os.PathLike[str],
    labels: np.ndarray | Volume | None = None,
    label_names: Any = None,
    label_colors: Any = None,
    viewer: Any = None,
) -> Any:
    """Open ``volume`` (and ``labels``) in a napari viewer in physical millimetres; returns the viewer.

    Needs napari with a Qt binding and a display (raises RuntimeError otherwise).
    """
    if viewer is None and not _has_display():
        raise RuntimeError(
            "open_in_napari needs a display (no DISPLAY / WAYLAND_DISPLAY set); in a headless "
            "notebook use napari_medmamba.notebook.view(...) instead"
        )
    try:
        import napari
    except ImportError as exc:
        raise RuntimeError(f"open_in_napari needs napari with a Qt binding ({exc}): pip install 'napari-medmamba[qt]'") from exc
    vol = _as_volume(volume)
    affine = vol.geometry.zyx_affine()
    if viewer is None:
        viewer = napari.Viewer()
    viewer.add_image(vol.array, name=vol.name, affine=affine)
    if labels is not None:
        arr = labels.array if isinstance(labels, Volume) else np.asarray(labels)
        layer = viewer.add_labels(arr, name=f"{vol.name} labels", affine=affine)
        if label_colors is not None:
            try:
                from napari.utils.colormaps import DirectLabelColormap

                items = label_colors.items() if isinstance(label_colors, dict) else enumerate(label_colors)
                mapping: dict[Any, Any] = {int(k): c for k, c in items if int(k) != 0}
                mapping[0] = "transparent"
                mapping[None] = "transparent"
                layer.colormap = DirectLabelColormap(color_dict=mapping)
            except Exception:  # pragma: no cover - older napari
                pass
        if label_names is not None:
            items = label_names.items() if isinstance(label_names, dict) else enumerate(label_names)
            layer.metadata["label_names"] = {int(k): str(v) for k, v in items}
    return viewer
