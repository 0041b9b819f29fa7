"""``export_gguf``: a full-precision Llama HF folder as one llama.cpp GGUF file (f16, q8_0, q4_0, q5_0, q5_1).

GGUF is what CPU runtimes load (llama.cpp, Ollama, LM Studio); GPTQ/AWQ are GPU formats. The file is written with
the ``gguf`` package's writer and its numpy quantizers (``gguf.quants``, the reference ggml block formats), tensor
by tensor, so peak memory is about one tensor. Which tensor gets which type (``tensor_type``):

- 1-D tensors (the RMSNorm weights) stay F32, as in every llama.cpp file;
- the token embedding (and the output projection when untied) is Q8_0 for the 4/5-bit types: it is also the
  logits layer of a tied model, the tensor llama.cpp's own quantizer keeps at higher precision;
- a matrix whose rows are not a multiple of the 32-value block falls back to F16;
- everything else gets the requested type.

How the file was made is stored inside it, as GGUF metadata (the GGUF is the unit people copy): ``general.*``
(name, type, file type, quantization version) and ``lorakit.*`` keys, read back by :func:`read_export_meta`.
:func:`export_gguf_folder` (the release flow's form, since registry artifacts are folders) adds the same record as a
``lorakit_export.json`` sidecar. Nothing is left behind on failure: the file is written to a hidden temporary sibling and
renamed into place when complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import InputError
from lorakit.export.types import GGUF_TYPES

META_PREFIX = "lorakit."


@dataclass
class ExportResult:
    output: Path
    metadata: dict[str, Any]


def _ggml_types():
    import gguf

    t, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f16": (t.F16, f.MOSTLY_F16), "q8_0": (t.Q8_0, f.MOSTLY_Q8_0), "q4_0": (t.Q4_0, f.MOSTLY_Q4_0),
        "q5_0": (t.Q5_0, f.MOSTLY_Q5_0), "q5_1": (t.Q5_1, f.MOSTLY_Q5_1),
    }


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str):
    """The ggml type one tensor is stored in for the requested file type (see module docstring)."""
    import gguf

    t = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return t.F32
    wanted = _ggml_types()[qtype][0]
    if qtype in ("q4_0", "q5_0", "q5_1") and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = t.Q8_0
    if wanted != t.F16 and shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return t.F16
    return wanted


def encode_tensor(array: np.ndarray, ggml_type) -> np.ndarray:
    """The bytes (as a numpy array) of one tensor in ``ggml_type``."""
    import gguf

    t = gguf.GGMLQuantizationType
    if ggml_type == t.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == t.F16:
        if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
            raise InputError("a weight exceeds float16's range (65504), so it cannot be stored as an f16 GGUF "
                             "tensor; try --type q8_0 (the values are stored as int8 times a per-block scale)")
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type)


def _nbytes(shape: tuple[int, ...], ggml_type) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def export_gguf(
    source: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    qtype: str = "q8_0",
    force: bool = False,
    progress: bool = True,
    tokenizer_pre: str | None = None,
) -> ExportResult:
    """Write ``source`` (a full-precision Llama HF folder or reference) as a GGUF file of type ``qtype``."""
    import gguf

    from lorakit import __version__
    from lorakit.export.gguf_llama import check_llama_config, gguf_name, write_hparams
    from lorakit.export.gguf_vocab import read_vocab
    from lorakit.io.atomic import atomic_file, check_output_free
    from lorakit.models.folder import read_model_config, resolve_model_dir, tensor_index, ties_embeddings

    if qtype not in GGUF_TYPES:
        raise InputError(f"GGUF type {qtype!r} is not one of {', '.join(GGUF_TYPES)}")
    output = Path(output)
    check_output_free(output, force)
    if output.is_dir():
        raise InputError(f"output {output} is a folder; pass a file path such as model.{qtype}.gguf")
    start = time.perf_counter()
    src = resolve_model_dir(source)
    config = read_model_config(src)
    check_llama_config(config, str(src))
    vocab = read_vocab(src, int(config["vocab_size"]), tokenizer_pre)
    tied = ties_embeddings(config)
    index = tensor_index(src)
    plan = []  # (hf name, gguf name, shape, ggml type): embedding, layers in numeric order, norm and output
    for hf in sorted(index, key=_write_order):
        name = gguf_name(hf, tied)
        if name is not None:
            shape = tuple(index[hf][1].shape)
            plan.append((hf, name, shape, tensor_type(name, shape, qtype)))
    names = {p[1] for p in plan}
    if "token_embd.weight" not in names or (not tied and "output.weight" not in names):
        raise InputError(f"{src} lacks the embedding or (untied) lm_head weights; the checkpoint is incomplete")

    digest = _digest_with_progress(src, index, progress)
    counts: dict[str, int] = {}
    for *_, t in plan:
        counts[t.name] = counts.get(t.name, 0) + 1
    meta = {
        "lorakit_version": __version__, "format": "gguf", "type": qtype, "architecture": "llama",
        "source": str(source if source is not None else "default"), "source_path": str(src),
        "source_weights_digest": digest, "tensor_types": counts, "tied_embeddings": tied,
        "tokenizer_pre": vocab.pre,
    }
    with atomic_file(output, force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type("model")
        writer.add_name(str(config.get("_model_name_or_path") or config.get("_name_or_path") or Path(src).name))
        writer.add_file_type(int(_ggml_types()[qtype][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, config, int(config["vocab_size"]))
        vocab.write(writer)
        for key in ("lorakit_version", "type", "source", "source_weights_digest", "tokenizer_pre"):
            writer.add_string(META_PREFIX + key, str(meta[key]))
        for hf, name, shape, t in plan:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, src, index, plan, config, progress)
        writer.close()
        size = tmp.stat().st_size
    meta.update(size_bytes=size, wall_time_s=round(time.perf_counter() - start, 3))
    return ExportResult(output, meta)


EXPORT_META = "lorakit_export.json"


def export_gguf_folder(
    source: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    qtype: str = "q8_0",
    force: bool = False,
    progress: bool = True,
) -> ExportResult:
    """A folder holding ``model.<qtype>.gguf`` and ``lorakit_export.json`` (the GGUF's provenance as a sidecar):
    the form the release flow registers, since registry artifacts are folders. Atomic like every lorakit output."""
    from lorakit.io.atomic import atomic_dir, check_output_free, write_json

    output = Path(output)
    check_output_free(output, force)
    with atomic_dir(output, force=force) as tmp:
        result = export_gguf(source, tmp / f"model.{qtype}.gguf", qtype=qtype, progress=progress)
        write_json(tmp / EXPORT_META, result.metadata)
    return ExportResult(output, result.metadata)


def _digest_with_progress(src: Path, index, progress: bool) -> str:
    """The source's weights digest (recorded in the file), with a bar: hashing a multi-GB model takes a while."""
    from tqdm.auto import tqdm

    from lorakit.models.folder import weights_digest

    total = sum((src / shard).stat().st_size for shard in {shard for shard, _ in index.values()})
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing source", disable=not progress, leave=False) as bar:
        return weights_digest(src, bar.update)


def _write_order(hf_name: str) -> tuple:
    """Embedding first, then layers in numeric order, then the final norm and output (llama.cpp's own order)."""
    import re

    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    if m:
        return (1, int(m.group(1)), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)


def _write_tensors(writer, src: Path, index, plan, config: dict, progress: bool) -> None:
    """Convert and append each tensor in plan order (the order of the tensor infos already written)."""
    import torch
    from tqdm.auto import tqdm

    from lorakit.export.gguf_llama import prepare_tensor
    from lorakit.io.safetensors_stream import read_tensor

    handles: dict[str, Any] = {}
    try:
        for hf, name, shape, t in tqdm(plan, desc="gguf", unit="tensor", disable=not progress, leave=False):
            shard, info = index[hf]
            if shard not in handles:
                handles[shard] = open(src / shard, "rb")
            value = read_tensor(handles[shard], info)
            if not torch.isfinite(value).all():
                raise InputError(f"{src}: tensor {hf} holds NaN or Inf values; refusing to export a broken model")
            array = prepare_tensor(hf, value.to(torch.float32).numpy(), config)
            writer.write_tensor_data(encode_tensor(array, t))
    finally:
        for fh in handles.values():
            fh.close()


def read_export_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``general.*`` and ``lorakit.*`` keys of a GGUF file (how it was made), as plain values."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc})") from None
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(("general.", META_PREFIX)):
            out[key] = field.contents()
    return out
