"""napari-medmamba: Mamba-based 3D medical image segmentation you can correct and adapt.

The core (``io``, ``ssm``, ``models``, ``inference``, ``training``, ``annotation``) is
Qt-free; only ``napari_medmamba._napari`` imports napari, Qt or magicgui.
"""

__version__ = "0.1.0"
