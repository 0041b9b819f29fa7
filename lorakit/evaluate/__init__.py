"""Evaluation of plain, adapter and GPTQ/AWQ models: perplexity with one fixed, recorded method, and task accuracy
(greedy answers to held-out prompts, scored by exact match and token F1).

Importing the package is light (the run config and the CLI read :mod:`lorakit.evaluate.options`); the measuring
code, which needs torch, loads on first use of a name below.
"""

from lorakit.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "accuracy": ("Prediction", "TaskAccuracy", "diff_predictions", "task_accuracies", "task_accuracy"),
    "core": ("METHOD_NAME", "PairResult", "PerplexityResult", "evaluate_models", "perplexity", "perplexity_pair",
             "read_results", "score_windows"),
    "dequant": ("dequantize_awq", "dequantize_gptq"),
    "loading": ("EvalModel", "ModelSpec", "describe_model", "load_eval_model", "load_tokenizer", "model_digest"),
    "text": ("EvalTexts", "EvalTokens", "read_eval_texts", "tokenize_eval_texts", "tokenizer_digest"),
    "windows": ("Window", "plan_windows"),
})
