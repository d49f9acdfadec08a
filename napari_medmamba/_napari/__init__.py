"""napari integration (the only part of the package importing napari, Qt or magicgui).

Contributions are listed in napari.yaml; each lives in one private module:
``_reader``, ``_writer``, ``_sample_data``; ``_layers`` converts Volumes to layers and back.
"""

from ._triton_preload import preload_triton

preload_triton()  # before anything can make torch import triton after napari's OpenGL canvas (see the module)
