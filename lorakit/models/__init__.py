"""Base models: the embedded default (SmolLM2-135M-Instruct from a PyPI wheel) and tiny test models."""

from lorakit.models.embedded import DEFAULT_MODEL_NAME, MODEL_ID, default_model_dir, ensure_default_model, resolve_base

__all__ = ["DEFAULT_MODEL_NAME", "MODEL_ID", "default_model_dir", "ensure_default_model", "resolve_base"]
