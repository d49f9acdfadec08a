"""Training (Qt-free): data cache, augmentation, losses, fixed splits and a time-budgeted trainer.

Import submodules directly (``napari_medmamba.training.trainer``); ``dataset.build_cache`` needs
SimpleITK, everything used by the trainer needs NumPy, torch and safetensors only.
"""
