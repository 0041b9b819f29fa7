"""Prepared datasets: the folder ``lorakit prep`` writes and the readers later stages use."""

from lorakit.data.splits import PREP_META, SPLITS, read_texts, split_texts_path

__all__ = ["PREP_META", "SPLITS", "read_texts", "split_texts_path"]
