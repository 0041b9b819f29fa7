"""lorakit's local model registry: versioned, content-addressed artifacts with lineage and gated promotion.

Top-level package on purpose: it may use ``lorakit.io`` and ``lorakit.errors`` but nothing of Prefect, tasks or
flows, and ``lorakit`` itself reaches it only lazily (``lorakit.models.folder.resolve_model_dir``) to accept
registry references wherever it takes a model or adapter path.
"""

from registry.core import (
    AliasMove, ArtifactVersion, GcReport, LineageNode, Registry, VerifyReport, default_root, resolve_reference,
)
from registry.errors import CorruptArtifactError, PromotionRefusedError, RegistryBusyError, UnknownReferenceError
from registry.metadata import KINDS
from registry.refs import Ref, looks_like_ref, parse_ref, validate_name

__all__ = [
    "AliasMove", "ArtifactVersion", "CorruptArtifactError", "GcReport", "KINDS", "LineageNode",
    "PromotionRefusedError", "Ref", "Registry", "RegistryBusyError", "UnknownReferenceError", "VerifyReport",
    "default_root", "looks_like_ref", "parse_ref", "resolve_reference", "validate_name",
]
