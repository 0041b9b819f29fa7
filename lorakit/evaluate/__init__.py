"""Evaluation of plain, adapter and GPTQ/AWQ models: perplexity with one fixed, recorded method, and task accuracy
(greedy answers to held-out prompts, scored by exact match and token F1).

Importing the package is light (the run config and the CLI read :mod:`lorakit.evaluate.options`); the measuring
code, which needs torch, loads on first use of a name below.
"""

from typing import Any

_NAMES = {
    "accuracy": ("Prediction", "TaskAccuracy", "diff_predictions", "task_accuracies", "task_accuracy"),
    "core": ("METHOD_NAME", "PerplexityResult", "evaluate_models", "perplexity", "read_results", "score_windows"),
    "dequant": ("dequantize_awq", "dequantize_gptq"),
    "loading": ("EvalModel", "ModelSpec", "describe_model", "load_eval_model", "load_tokenizer"),
    "text": ("EvalTexts", "EvalTokens", "read_eval_texts", "tokenize_eval_texts", "tokenizer_digest"),
    "windows": ("Window", "plan_windows"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit.evaluate' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"lorakit.evaluate.{module}"), name)
