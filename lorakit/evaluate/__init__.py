"""Evaluation of plain, adapter and GPTQ/AWQ models: perplexity with one fixed, recorded method, and task accuracy
(greedy answers to held-out prompts, scored by exact match and token F1)."""

from lorakit.evaluate.accuracy import Prediction, TaskAccuracy, diff_predictions, task_accuracies, task_accuracy

from lorakit.evaluate.core import METHOD_NAME, PerplexityResult, evaluate_models, perplexity, read_results, score_windows
from lorakit.evaluate.dequant import dequantize_awq, dequantize_gptq
from lorakit.evaluate.loading import EvalModel, ModelSpec, describe_model, load_eval_model, load_tokenizer
from lorakit.evaluate.text import EvalTexts, EvalTokens, read_eval_texts, tokenize_eval_texts, tokenizer_digest
from lorakit.evaluate.windows import Window, plan_windows

__all__ = [
    "Prediction", "TaskAccuracy", "diff_predictions", "task_accuracies", "task_accuracy",
    "METHOD_NAME", "EvalModel", "EvalTexts", "EvalTokens", "ModelSpec", "PerplexityResult", "Window",
    "dequantize_awq", "dequantize_gptq", "describe_model", "evaluate_models", "load_eval_model", "load_tokenizer", "perplexity",
    "plan_windows", "read_eval_texts", "read_results", "score_windows", "tokenize_eval_texts", "tokenizer_digest",
]
