"""Exact merging of LoRA adapters (linear, TIES, DARE, magnitude pruning) into an adapter or a model.

Importing the package is light (the run config and the CLI read the search objectives from
:mod:`lorakit.merge.objectives`); the merging code, which needs torch, loads on first use of its names.
"""

from typing import Any

_CORE = ("MERGE_META", "MergeResult", "check_weights", "merge_adapters")
_REGISTRY = ("get_method", "method_names")

__all__ = [*_CORE, *_REGISTRY]


def __getattr__(name: str) -> Any:
    if name in _CORE:
        from lorakit.merge import core

        return getattr(core, name)
    if name in _REGISTRY:
        from lorakit.merge import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'lorakit.merge' has no attribute {name!r}")
