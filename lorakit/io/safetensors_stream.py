"""Streaming safetensors I/O: read one tensor at a time, patch tensors of a copied file in place.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each tensor to its dtype,
shape and byte range, then the raw data. Because a merge changes values but never shapes or dtypes, the merged
shard is the base shard with some byte ranges rewritten: lorakit copies the file (hashing it on the way) and
overwrites only the target tensors. Peak memory is one tensor, not one model, and non-target tensors are never
decoded at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; a truncated or corrupt file raises :class:`InputError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path} is not a safetensors file (shorter than 8 bytes); it is truncated or corrupt")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise InputError(f"{path} has an invalid safetensors header length; the file is truncated or corrupt")
            header = json.loads(fh.read(header_len))
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} has a corrupt safetensors header; re-create or re-download the file") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (lo, hi) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry; the file is corrupt") from None
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {name!r} has dtype {dtype}, which lorakit does not handle")
        info = TensorInfo(name, dtype, shape, base + lo, base + hi)
        expected = torch.Size(shape).numel() * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if hi - lo != expected:
            raise InputError(f"{path}: tensor {name!r} has {hi - lo} bytes for shape {list(shape)}; the file is corrupt")
        if info.end > size:
            raise InputError(
                f"{path} is truncated: tensor {name!r} ends at byte {info.end} but the file has {size}; "
                "re-create or re-download it"
            )
        tensors[name] = info
    return tensors, meta


def read_tensor(fh, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from an open binary file into a fresh (writable) tensor."""
    fh.seek(info.start)
    buf = bytearray(info.end - info.start)
    n = fh.readinto(buf)
    if n != len(buf):
        raise InputError(f"{getattr(fh, 'name', 'file')} ended early while reading {info.name!r}; it is truncated")
    if not buf:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def load_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load every tensor of a (small) safetensors file, with lorakit's validation and errors."""
    tensors, _ = read_header(path)
    with open(path, "rb") as fh:
        return {name: read_tensor(fh, info) for name, info in tensors.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def copy_with_digest(src: Path, dst: Path, chunk: int = 8 << 20) -> str:
    """Copy a file while hashing it, so recording the input's digest costs no second read."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while data := fi.read(chunk):
            h.update(data)
            fo.write(data)
    return h.hexdigest()


def overwrite_tensor(fh, info: TensorInfo, value: torch.Tensor) -> None:
    """Replace one tensor's bytes in a file opened ``r+b``; shape and dtype must be unchanged."""
    if tuple(value.shape) != info.shape or value.dtype != info.torch_dtype:
        raise ValueError(f"{info.name}: new value {tuple(value.shape)}/{value.dtype} does not match the file")
    fh.seek(info.start)
    fh.write(tensor_bytes(value))


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (the header is known up front from shapes and dtypes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            fh.write(tensor_bytes(t))
