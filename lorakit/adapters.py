"""PEFT LoRA adapter folders: read, validate, and express each module's update ΔW = scaling·B·A.

Reading is strict on purpose. PEFT silently accepts adapters whose merge would be wrong (LoRA biases, tied
embeddings, PiSSA/OLoRA factors saved relative to a residual base); lorakit refuses them with a message that names
the adapter and the fix, before any output is created. DoRA adapters are read with their magnitudes: their update
depends on the base weight, W' − W with W' = m·(W + s·B·A)/‖W + s·B·A‖ (row norms), and is materialised as such.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import IncompatibleAdaptersError, InputError
from lorakit.io.atomic import read_json
from lorakit.io.digests import folder_digest
from lorakit.io.safetensors_stream import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAIN_META = "lorakit_train.json"
_PREFIX = "base_model.model."
_BASE_CHANGING_INITS = ("pissa", "olora", "corda")
_MAGNITUDE = ".lora_magnitude_vector"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
TIED_TARGETS = ("lm_head", "embed_tokens", "wte", "word_embeddings", "embed_in", "embed_out")


def pattern_value(patterns: dict[str, float | int], module: str, default: float | int) -> float | int:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching a dotted suffix of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha/r, or alpha/√r for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraModule:
    """One adapted linear layer: ``delta()`` is the exact weight update PEFT's merge would add."""

    name: str
    A: torch.Tensor  # [r, in_features]
    B: torch.Tensor  # [out_features, r]
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: the learned norm of each output row of the merged weight

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this module updates (transposed for Conv1D-style layers)."""
        out_f, in_f = self.B.shape[0], self.A.shape[1]
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def delta(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """The update in [out, in] layout; :func:`to_weight_layout` maps it onto the stored weight.

        LoRA: scaling·B·A. DoRA: m/‖W + scaling·B·A‖ · (W + scaling·B·A) − W with row norms, as PEFT merges it
        (``peft/tuners/lora/dora.py``), which needs ``base`` = W in [out, in] layout; computed in float64.
        """
        if self.magnitude is None:
            return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling
        if base is None:
            raise ValueError(f"{self.name} is a DoRA module: its update depends on the base weight; pass base=")
        w = base.double()
        merged = w + (self.B.double() @ self.A.double()) * self.scaling
        norm = torch.linalg.norm(merged, dim=1)
        return ((self.magnitude.double() / norm)[:, None] * merged - w).to(dtype)

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta


@dataclass
class Adapter:
    """A validated PEFT LoRA adapter folder."""

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    digest: str
    base_name: str | None
    base_digest: str | None = None
    extra: dict = field(default_factory=dict)
    init: str = "default"  # lorakit_train.json's init; "loftq": the update belongs to the NF4-quantized base

    @property
    def dora(self) -> bool:
        return any(m.dora for m in self.modules.values())

    @property
    def loftq(self) -> bool:
        return self.init == "loftq"

    @property
    def label(self) -> str:
        return str(self.path)

    def summary(self) -> dict:
        ranks = Counter(m.rank for m in self.modules.values())
        return {
            "path": str(self.path),
            "digest": self.digest,
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "ranks": dict(sorted(ranks.items())),
            "modules": len(self.modules),
            "base_model": self.base_name,
            "base_digest": self.base_digest,
            "variant": "dora" if self.dora else "lora",
            "init": self.init,
        }


def _refuse_variants(path: Path, cfg: dict) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"adapter {path} is a {peft_type} adapter; lorakit merges LoRA adapters only")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise InputError(
            f"adapter {path} was initialised with {init} and saved unconverted: its factors are relative to a residual "
            "base that no longer exists; re-save it with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<adapter saved right after init>), as lorakit train does"
        )
    if cfg.get("lora_bias"):
        raise InputError(f"adapter {path} trains LoRA biases (lora_bias=true), which lorakit does not merge; retrain without")
    if cfg.get("modules_to_save"):
        raise InputError(
            f"adapter {path} also saves full modules ({', '.join(cfg['modules_to_save'])}); their weights are not "
            "low-rank deltas and cannot be weighted exactly; retrain without modules_to_save"
        )
    if cfg.get("trainable_token_indices"):
        raise InputError(f"adapter {path} trains token embeddings (trainable_token_indices); not supported for merging")


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and validate one adapter folder (or registry reference); every problem is an :class:`InputError`."""
    path = Path(path)
    if not path.is_dir():
        from lorakit.models.folder import resolve_registry_ref

        path = resolve_registry_ref(path) or path
    if not path.is_dir():
        raise InputError(f"adapter {path} does not exist or is not a folder; pass a PEFT adapter folder")
    cfg = read_json(path / CONFIG_FILE, f"adapter config of {path}:")
    if not isinstance(cfg, dict):
        raise InputError(f"{path / CONFIG_FILE} is not a JSON object; the adapter is corrupt")
    _refuse_variants(path, cfg)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise InputError(
                f"adapter {path} stores pickled weights (adapter_model.bin); re-save it with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise InputError(f"adapter {path} has no {WEIGHTS_FILE}")
    tensors = load_file(weights)

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_embedding_" in name:
            raise InputError(
                f"adapter {path} adapts an embedding layer ({name}); lorakit merges linear-layer LoRA only; "
                "retrain without embedding targets"
            )
        if name.endswith((_MAGNITUDE, _MAGNITUDE + ".weight")):
            if t.dim() != 1 or not torch.isfinite(t).all():
                raise InputError(f"adapter {path}: DoRA magnitude {key} is not a finite vector; the adapter is broken")
            parts.setdefault(name[: name.index(_MAGNITUDE)], {})["M"] = t
            continue
        if name.endswith(".base_layer.weight"):
            # PEFT saves frozen copies of embedding/lm_head base weights when those are targeted
            # (save_embedding_layers); they are not part of the update and are checked against the base instead.
            continue
        m = _KEY.match(name)
        if not m:
            raise InputError(f"adapter {path} holds an unexpected tensor {key!r}; it is not a plain LoRA adapter")
        if t.dim() != 2:
            raise InputError(f"adapter {path}: {key} has shape {list(t.shape)}; LoRA factors must be matrices")
        if not torch.isfinite(t).all():
            raise InputError(f"adapter {path}: {key} contains NaN or Inf values; the adapter is broken (retrain it)")
        parts.setdefault(m["module"], {})[m["part"]] = t

    if not parts:
        raise InputError(f"adapter {path} contains no LoRA weights")
    modules: dict[str, LoraModule] = {}
    for name, ab in sorted(parts.items()):
        magnitude = ab.pop("M", None)
        if set(ab) != {"A", "B"}:
            raise InputError(f"adapter {path}: module {name} has lora_{''.join(ab)} but not both factors; it is corrupt")
        A, B = ab["A"], ab["B"]
        if bool(cfg.get("use_dora")) != (magnitude is not None):
            raise InputError(
                f"adapter {path} is {'a DoRA adapter (use_dora=true)' if cfg.get('use_dora') else 'not a DoRA adapter'} "
                f"but module {name} {'lacks' if magnitude is None else 'has'} a magnitude vector; config and weights "
                "do not belong together"
            )
        if magnitude is not None and magnitude.shape[0] != B.shape[0]:
            raise InputError(f"adapter {path}: DoRA magnitude of {name} has {magnitude.shape[0]} entries for "
                             f"{B.shape[0]} output features; the adapter is corrupt")
        r = int(pattern_value(rank_pattern, name, r_default))
        alpha = float(pattern_value(alpha_pattern, name, alpha_default))
        if A.shape[0] != r or B.shape[1] != r:
            raise InputError(
                f"adapter {path}: module {name} has rank {A.shape[0]}/{B.shape[1]} in its weights but r={r} in "
                f"{CONFIG_FILE}; config and weights do not belong together"
            )
        modules[name] = LoraModule(name, A, B, lora_scaling(alpha, r, rslora), fifo, magnitude)

    train_meta = path / TRAIN_META
    meta = read_json(train_meta, "training metadata") if train_meta.exists() else {}
    peft_loftq = str(cfg.get("init_lora_weights")).lower() == "loftq"  # PEFT's own LoftQ flow
    trained_init = (meta.get("config") or {}).get("init") or ("loftq" if peft_loftq else "default")
    digest = folder_digest(path, exclude=())
    return Adapter(path, cfg, modules, digest, cfg.get("base_model_name_or_path"), meta.get("base_digest"),
                   init=trained_init)


def _norm_base(name: str | None) -> str | None:
    return None if not name else str(name).rstrip("/")


def check_compatible(adapters: list[Adapter], *, ignore_base_name: bool = False) -> None:
    """Refuse adapters that cannot be combined module by module (base, targets, shapes)."""
    if not adapters:
        raise InputError("no adapters given; pass at least one PEFT adapter folder")
    first = adapters[0]
    digests = [a.base_digest for a in adapters]
    for other in adapters[1:]:
        if all(digests) and other.base_digest != first.base_digest:
            raise IncompatibleAdaptersError(
                f"adapters were trained on different base models: {first.label} on {first.base_name} "
                f"(digest {first.base_digest[:12]}), {other.label} on {other.base_name} (digest {other.base_digest[:12]}); "
                "merge adapters of one base model"
            )
        if not ignore_base_name and not all(digests) and _norm_base(other.base_name) != _norm_base(first.base_name):
            raise IncompatibleAdaptersError(
                f"adapters were trained on different base models: {first.label} on {first.base_name!r}, "
                f"{other.label} on {other.base_name!r}; merge adapters of one base model, or pass --ignore-base-name "
                "if both names refer to the same weights"
            )
        a_names, b_names = set(first.modules), set(other.modules)
        if a_names != b_names:
            only_a = sorted(a_names - b_names)
            only_b = sorted(b_names - a_names)
            detail = f"{only_b[0]} is only in {other.label}" if only_b else f"{only_a[0]} is only in {first.label}"
            raise IncompatibleAdaptersError(
                f"adapters target different modules ({detail}; {len(only_a) + len(only_b)} differ); "
                "merge adapters trained with the same target modules and layers (--target, --layers)"
            )
        for name in sorted(a_names):
            ma, mb = first.modules[name], other.modules[name]
            if ma.weight_shape != mb.weight_shape or ma.fan_in_fan_out != mb.fan_in_fan_out:
                raise IncompatibleAdaptersError(
                    f"module {name} updates a {list(ma.weight_shape)} weight in {first.label} but a "
                    f"{list(mb.weight_shape)} weight in {other.label}; the adapters are for different architectures"
                )


def check_tied_targets(adapters: list[Adapter], tie_word_embeddings: bool, base_label: str) -> None:
    """Refuse updates to a tied output/input embedding: merging one would silently change the other."""
    if not tie_word_embeddings:
        return
    for a in adapters:
        for name in a.modules:
            if name.split(".")[-1] in TIED_TARGETS:
                raise IncompatibleAdaptersError(
                    f"adapter {a.label} targets {name}, which is tied to the input embedding in base model "
                    f"{base_label}; merging it would change both; retrain without {name.split('.')[-1]}"
                )
