"""Exact merging of LoRA adapters (linear, TIES, DARE, magnitude pruning) into an adapter or a model."""

from lorakit.merge.core import MERGE_META, MergeResult, check_weights, merge_adapters
from lorakit.merge.registry import get_method, method_names

__all__ = ["MERGE_META", "MergeResult", "check_weights", "get_method", "merge_adapters", "method_names"]
