"""QLoRA / LoRA training of one adapter per task on a prepared-data folder (``lorakit train``).

Importing the package is light (the run config and the CLI read :mod:`lorakit.train.options`); the training code,
which needs torch, loads on first use of a name below.
"""

from typing import Any

_NAMES = {
    "loop": ("TRAIN_LOG", "TrainConfig", "TrainRecord", "TrainResult", "read_train_record", "train_adapter"),
    "model": ("CpuRepackError", "assert_not_repacked", "repacked_modules"),
    "sanity": ("TrainingSanityError",),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"lorakit.train.{module}"), name)
