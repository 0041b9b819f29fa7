"""HF model folders: find their config and safetensors shards, and resolve what a user passed as ``--base``.

``--base`` may be omitted (the embedded default), a local folder, a registry reference (``name@production``,
``name@3``, ``sha256:...``), or a hub id (used from the local HF cache or downloaded when a hub is reachable).
Every command resolves models here, so all of them accept the same kinds of model reference.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import InputError
from lorakit.io.atomic import read_json
from lorakit.io.safetensors_stream import TensorInfo, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def resolve_model_dir(ref: str | os.PathLike[str] | None) -> Path:
    """A local folder for a model reference (None/"default" = embedded SmolLM2-135M-Instruct)."""
    from lorakit.models.embedded import DEFAULT_MODEL_NAME, ensure_default_model

    if ref is None or str(ref) in ("", "default", DEFAULT_MODEL_NAME):
        return ensure_default_model()
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    registered = resolve_registry_ref(ref)
    if registered is not None:
        return registered
    if path.exists():
        raise InputError(f"model {ref} is a file, not a model folder; pass the folder that holds config.json")
    if str(ref).startswith((".", "/", "~")) or str(ref).count("/") != 1:
        raise InputError(f"model {ref} does not exist; pass an HF model folder or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise InputError(
            f"model {ref} is not a local folder and could not be fetched from the hub ({type(exc).__name__}); "
            "pass a local HF model folder"
        ) from None


def resolve_registry_ref(ref: str | os.PathLike[str]) -> Path | None:
    """The verified registry checkout for ``name@alias``/``name@N``/``sha256:...``; None for anything else.

    ``registry`` is a top-level package above ``lorakit``; this lazy import is the one place lorakit reaches up
    to it (adapter loading comes through here too), so lorakit never needs the registry to import.
    """
    text = str(ref).strip()
    if "/" in text or os.sep in text or ("@" not in text and not text.startswith("sha256:")):
        return None  # a path or a hub id: registry references have neither separators nor a missing '@'
    import registry

    return registry.resolve_reference(text)


def read_model_config(model_dir: Path) -> dict:
    if not (model_dir / "config.json").exists():
        raise InputError(f"{model_dir} is not an HF model folder (no config.json)")
    return read_json(model_dir / "config.json", "model config")


def ties_embeddings(config: dict) -> bool:
    """HF's rule: absent ``tie_word_embeddings`` means tied."""
    text_cfg = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", True)))


def shard_names(model_dir: Path) -> list[str]:
    """The safetensors shard files of a model folder, in index order."""
    if (model_dir / INDEX_FILE).exists():
        index = read_json(model_dir / INDEX_FILE, "safetensors index")
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise InputError(f"{model_dir / INDEX_FILE} lists no shards; the model folder is corrupt")
        return names
    if (model_dir / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    if any(model_dir.glob("*.bin")):
        raise InputError(f"{model_dir} stores pickled weights (*.bin); re-save it with safetensors (save_pretrained)")
    raise InputError(f"{model_dir} holds no model.safetensors; pass an HF model folder saved with safetensors")


def weights_digest(model_dir: Path, progress=None) -> str:
    """Identity of a model's weights: the digest of its shard files (config and tokenizer excluded).

    Training records it as ``base_digest`` and merging recomputes it, so an adapter is never folded into weights
    other than the ones it was trained on. ``progress`` receives byte counts (for a progress bar on large models).
    """
    from lorakit.io.digests import manifest_digest, sha256_file

    return manifest_digest({shard: sha256_file(model_dir / shard, progress) for shard in shard_names(model_dir)},
                           "weights")


def tensor_index(model_dir: Path) -> dict[str, tuple[str, TensorInfo]]:
    """Every tensor of the model: name -> (shard file, where it lives), read from headers only."""
    out: dict[str, tuple[str, TensorInfo]] = {}
    for shard in shard_names(model_dir):
        tensors, _ = read_header(model_dir / shard)
        for name, info in tensors.items():
            out[name] = (shard, info)
    return out


def linear_weight_shapes(model_dir: Path, targets: str | list[str]) -> dict[str, tuple[int, int]]:
    """Module name -> weight shape (out, in) of the linear layers an adapter with ``targets`` adapts, from the
    weight headers alone (nothing loads, so a run config is checked against a 70B base in a second).

    ``all-linear`` follows PEFT's rule, every linear layer but the output head: every 2-D ``.weight`` except the
    vocabulary's (its rows are ``vocab_size``: the input embedding and the output head). A list names modules as
    PEFT matches them: the full name or its last components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``);
    ``lorakit.train.model.parse_targets`` turns ``q,v`` into that list. A layer stored transposed (GPT-2's Conv1D)
    reads as (in, out).
    """
    config = read_model_config(model_dir)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    shapes: dict[str, tuple[int, int]] = {}
    for name, (_, info) in tensor_index(model_dir).items():
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = name.removesuffix(".weight")
        if targets == "all-linear":
            if info.shape[0] == vocab or "embed" in module or module.endswith("lm_head"):
                continue
        elif not any(module == t or module.endswith(f".{t}") for t in targets):
            continue
        shapes[module] = (int(info.shape[0]), int(info.shape[1]))
    return shapes
