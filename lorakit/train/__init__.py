"""QLoRA / LoRA training of one adapter per task on a prepared-data folder (``lorakit train``).

Importing the package is light (the run config and the CLI read :mod:`lorakit.train.options`); the training code,
which needs torch, loads on first use of a name below.
"""

from lorakit.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "child": ("train_in_child",),
    "loop": ("TRAIN_LOG", "TrainConfig", "TrainRecord", "TrainResult", "read_train_record", "train_adapter"),
    "model": ("CpuRepackError", "assert_not_repacked", "repacked_modules"),
    "sanity": ("TrainingSanityError",),
})
