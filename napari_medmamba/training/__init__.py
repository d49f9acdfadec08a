"""Training (Qt-free): data cache, augmentation, losses, fixed splits and a time-budgeted trainer.

Import submodules directly (``napari_medmamba.training.trainer``); ``dataset.build_cache`` needs
SimpleITK, everything used by the trainer needs NumPy, torch and safetensors only.
"""

__all__ = ["CorrectionExample", "FinetuneResult", "finetune", "register_finetuned", "unregister"]


def __getattr__(name: str):  # lazy: finetune needs SimpleITK (engine preprocessing); the trainer path must not
    if name in __all__:
        from . import finetune as _ft

        return getattr(_ft, name)
    raise AttributeError(name)
