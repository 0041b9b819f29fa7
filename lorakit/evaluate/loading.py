"""Load any model lorakit produces for evaluation: HF folders, PEFT adapters (base + adapter), GPTQ/AWQ folders,
GGUF files.

``describe_model`` reads only JSON (cheap), so a comparison can refuse mismatched tokenizers before loading a
single weight. ``load_eval_model`` then builds the model on the chosen device, in eval mode.

Quantized folders have two paths, recorded as ``path_used``:
``<method>-kernel``       plain ``from_pretrained`` with the installed GPTQ/AWQ kernels (gptqmodel/optimum);
``<method>-dequantized``  every packed layer dequantized exactly (``lorakit.evaluate.dequant``) into a dense
                          ``nn.Linear``; the same weights, several times faster on CPU. ``quant_path="auto"``
                          picks it on CPU and the kernels on CUDA.

GGUF files (``lorakit export --format gguf``; a ``.gguf`` path, or a folder holding exactly one ``.gguf`` and no
``config.json``) are read by transformers' own GGUF loader, which dequantizes every tensor to a dense weight
(``path_used: gguf-dequantized``): an independent reader of what lorakit wrote, tokenizer included.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import InputError
from lorakit.io.atomic import read_json

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
QUANT_METHODS = ("gptq", "awq")
QUANT_PATHS = ("auto", "dequantized", "kernel")


@dataclass
class ModelSpec:
    """What a model reference points at, read from its JSON files only."""

    ref: str
    folder: Path
    kind: str  # "model" | "adapter" | "gptq" | "awq" | "gguf" (then folder and tokenizer_folder are the .gguf file)
    tokenizer_folder: Path
    base: ModelSpec | None = None  # adapters only
    quant_config: dict | None = None

    def describe(self) -> dict:
        out: dict[str, Any] = {"ref": self.ref, "folder": str(self.folder), "kind": self.kind}
        if self.base is not None:
            out["base"] = self.base.describe()
        if self.quant_config:
            out["quant"] = {k: self.quant_config.get(k) for k in
                            ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "version",
                             "zero_point") if k in self.quant_config}
        return out


@dataclass
class EvalModel:
    """A loaded model ready to score windows, with how it was loaded."""

    spec: ModelSpec
    model: Any
    path_used: str
    device: torch.device
    dtype: str
    load_s: float
    tokenizer: Any = field(default=None, repr=False)

    def describe(self) -> dict:
        return {**self.spec.describe(), "path_used": self.path_used, "device": str(self.device),
                "dtype": self.dtype, "load_s": round(self.load_s, 3)}


def model_digest(spec: ModelSpec) -> dict[str, str]:
    """Content digests of the folders a model is loaded from (an adapter's and its base's): what makes a
    measurement of one folder reusable for another reference to it."""
    from lorakit.io.digests import folder_digest

    out = {"folder": folder_digest(spec.folder)}
    if spec.base is not None:
        out["base"] = folder_digest(spec.base.folder)
    return out


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def describe_model(ref: str | os.PathLike[str] | None, *, base: str | os.PathLike[str] | None = None) -> ModelSpec:
    """Classify a model reference without loading weights; ``base`` overrides an adapter's recorded base."""
    from lorakit.models.embedded import MODEL_ID
    from lorakit.models.folder import read_model_config, resolve_model_dir

    label = str(ref) if ref is not None else "default"
    gguf = gguf_file_of(ref)
    if gguf is not None:
        return ModelSpec(label, gguf, "gguf", gguf)
    folder = resolve_model_dir(ref)
    gguf = gguf_file_of(folder)
    if gguf is not None:  # a registered GGUF export resolves to its checkout folder
        return ModelSpec(label, gguf, "gguf", gguf)
    if (folder / ADAPTER_CONFIG).exists():
        cfg = read_json(folder / ADAPTER_CONFIG, "adapter config")
        base_ref = base if base is not None else cfg.get("base_model_name_or_path")
        if base is None and base_ref == MODEL_ID and not Path(base_ref).is_dir():
            base_ref = None  # the embedded default's hub id: use the local converted copy, as merging does
        elif not base_ref:
            raise InputError(f"adapter {folder} records no base model; pass its base with --base")
        try:
            base_spec = describe_model(base_ref)
        except InputError as exc:
            raise InputError(f"base model of adapter {folder} is unusable ({exc}); pass the base with --base") from None
        if base_spec.kind == "adapter":
            raise InputError(f"the base of adapter {folder} is itself an adapter ({base_spec.folder}); pass a model")
        tok = folder if _has_tokenizer(folder) else base_spec.tokenizer_folder
        return ModelSpec(label, folder, "adapter", tok, base=base_spec)
    config = read_model_config(folder)
    quant = config.get("quantization_config")
    kind = "model"
    if quant:
        kind = str(quant.get("quant_method", "")).lower()
        if kind not in QUANT_METHODS:
            raise InputError(f"model {folder} is quantized with {kind or 'an unknown method'!r}; lorakit evaluates "
                             "plain, GPTQ and AWQ folders")
    if not _has_tokenizer(folder):
        raise InputError(f"model {folder} has no tokenizer files; copy the tokenizer of its base model into it "
                         "(tokenizer.json, tokenizer_config.json)")
    return ModelSpec(label, folder, kind, folder, quant_config=quant)


def gguf_file_of(ref: str | os.PathLike[str] | None) -> Path | None:
    """The GGUF file a reference names: a ``.gguf`` file, or a folder with one ``.gguf`` and no config.json."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise InputError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); pass one of them")
        return files[0] if files else None
    return None


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    try:
        if spec.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(spec.folder.parent), gguf_file=spec.folder.name)
        return AutoTokenizer.from_pretrained(str(spec.tokenizer_folder))
    except Exception as exc:  # tokenizer loading raises many types; all mean "this folder's tokenizer is broken"
        raise InputError(f"cannot load the tokenizer of {spec.tokenizer_folder} ({type(exc).__name__}: {exc})") from None


def pick_device(device: str = "auto") -> torch.device:
    from lorakit.runtime import resolve_device

    return torch.device(resolve_device(device))


def _torch_dtype(dtype: str, stage: str, device: torch.device) -> torch.dtype:
    """``--compute-dtype`` of an evaluation: ``auto`` is float32 (lorakit.compute.POLICY: scores must compare
    across machines), whatever dtype the checkpoint was saved in."""
    from lorakit.compute import resolve_compute_dtype

    return resolve_compute_dtype(dtype, stage, device)


def choose_quant_path(quant_path: str, device: torch.device) -> str:
    if quant_path not in QUANT_PATHS:
        raise InputError(f"--quant-path must be one of {', '.join(QUANT_PATHS)}, got {quant_path!r}")
    if quant_path == "auto":
        return "kernel" if device.type == "cuda" else "dequantized"
    return quant_path


def load_eval_model(spec: ModelSpec, *, quant_path: str = "auto", device: str = "auto", dtype: str = "auto",
                    tokenizer=None, stage: str = "eval") -> EvalModel:
    """Load ``spec`` for scoring: eval mode, no gradients, on ``device``, computing in ``dtype`` as
    :func:`lorakit.compute.resolve_compute_dtype` resolves it for ``stage`` (eval or gate)."""
    dev = pick_device(device)
    start = time.perf_counter()
    if spec.kind == "adapter":
        from peft import PeftModel

        # The base's own tokenizer is never used here: the adapter's (or the base's, by describe_model) is.
        base = load_eval_model(spec.base, quant_path=quant_path, device=device, dtype=dtype, tokenizer=tokenizer,
                               stage=stage)
        try:
            model = PeftModel.from_pretrained(base.model, str(spec.folder), is_trainable=False)
        except Exception as exc:  # PEFT raises many types for adapters that do not fit the base
            raise InputError(f"adapter {spec.folder} does not load onto base {spec.base.folder} "
                             f"({type(exc).__name__}: {exc}); pass the base it was trained on with --base") from None
        model.to(dev).eval()
        path_used, torch_dtype = f"{base.path_used}+adapter", base.dtype
    elif spec.kind == "gguf":
        tdt = _torch_dtype(dtype, stage, dev)
        model, path_used = _from_gguf(spec.folder, tdt), "gguf-dequantized"
        model.to(dev).eval()
        torch_dtype = str(tdt).replace("torch.", "")
    else:
        from lorakit.models.folder import read_model_config

        config = read_model_config(spec.folder)
        tdt = _torch_dtype(dtype, stage, dev)
        if spec.kind == "model":
            model, path_used = _from_pretrained(spec.folder, tdt), "dense"
        elif choose_quant_path(quant_path, dev) == "kernel":
            try:
                model = _from_pretrained(spec.folder, tdt, device=dev, kind=spec.kind)
                path_used = f"{spec.kind}-kernel"
            except InputError:
                raise
            except Exception as exc:  # kernels refuse layouts per device (e.g. CPU int4 with K % group != 0)
                raise InputError(f"the installed {spec.kind.upper()} kernels cannot load {spec.folder} on {dev} "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); use --quant-path dequantized") from None
        else:
            model, path_used = _dequantized_model(spec, tdt), f"{spec.kind}-dequantized"
        model.to(dev).eval()
        torch_dtype = str(tdt).replace("torch.", "")
    return EvalModel(spec, model, path_used, dev, torch_dtype, time.perf_counter() - start,
                     tokenizer=tokenizer if tokenizer is not None else load_tokenizer(spec))


def _backend_override(folder: Path, kind: str) -> dict[str, Any]:
    """``quantization_config=`` for ``from_pretrained`` naming the backend, or nothing: transformers merges a
    passed config's loading attributes (the backend) into the checkpoint's own quantization config."""
    from lorakit.runtime import kernel_backend

    backend = kernel_backend(kind)
    if backend is None:
        return {}
    from transformers import AwqConfig, GPTQConfig

    bits = int((read_json(folder / "config.json").get("quantization_config") or {}).get("bits", 4))
    config = AwqConfig(bits=bits, backend=backend) if kind == "awq" else GPTQConfig(bits=bits, backend=backend)
    return {"quantization_config": config}


def _from_pretrained(folder: Path, dtype: torch.dtype, device: torch.device | None = None, kind: str = "model"):
    """``device`` places a quantized model while it loads: GPTQModel picks its kernels for the device the weights
    load on (transformers loads GPTQ onto the CPU when no device_map is given), so a model loaded on the CPU and
    moved to CUDA afterwards would keep CPU kernels. A quantized ``kind`` loads the kernels
    :func:`lorakit.runtime.kernel_backend` names."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": {"": str(device)}} if device is not None else {}
    if kind in QUANT_METHODS:
        placement.update(_backend_override(folder, kind))
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placement)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {folder} ({type(exc).__name__}: {exc})") from None


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"transformers cannot load GGUF {path} ({type(exc).__name__}: {exc})") from None


def _dequantized_model(spec: ModelSpec, dtype: torch.dtype):
    """A dense model whose quantized linears hold exactly ``(q - z)·s``; every other tensor as stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.evaluate.dequant import read_packed_linear
    from lorakit.io.safetensors_stream import load_file
    from lorakit.models.folder import shard_names

    qc = spec.quant_config or {}
    if spec.kind == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise InputError(f"AWQ version {qc.get('version')!r} of {spec.folder} has no exact dequantizer here; "
                         "use --quant-path kernel")
    config = AutoConfig.from_pretrained(str(spec.folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_names(spec.folder):
        tensors.update(load_file(spec.folder / shard))
    state: dict[str, torch.Tensor] = {}
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise InputError(f"{spec.folder} says it is {spec.kind} but holds no qweight tensors; the folder is corrupt")
    for prefix in prefixes:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise InputError(f"{spec.folder}: quantized layer {prefix} does not exist in the model config") from None
        try:
            packed = read_packed_linear(spec.kind, tensors, prefix, module.in_features, module.out_features,
                                        checkpoint_format=str(qc.get("checkpoint_format", "gptq")))
        except InputError as err:
            raise InputError(f"{spec.folder}: {err}") from None
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            tensors.pop(f"{prefix}.{name}", None)
        weight = packed.dense()
        state[f"{prefix}.weight"] = weight.to(dtype)
    for name, t in tensors.items():
        state[name] = t.to(dtype) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied |= {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise InputError(f"{spec.folder}: weights do not match the model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); the checkpoint is corrupt")
    model.tie_weights()
    return model
