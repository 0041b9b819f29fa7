"""Content digests: how lorakit (and its registry) name the exact bytes an artifact was made from."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in chunks so a multi-GB shard never sits in memory.

    ``progress`` receives the byte count of each chunk (for progress bars over large folders).
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def file_manifest(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Map each file's path (relative, POSIX) under ``folder`` to its sha256, in sorted order.

    A single-file artifact (a GGUF) is its own manifest: ``{file name: sha256}``.
    """
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: sha256_file(folder)}
    out: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out[path.relative_to(folder).as_posix()] = sha256_file(path)
    return out


def manifest_digest(manifest: dict[str, str], kind: str = "") -> str:
    """One digest for a set of files: sha256 over the sorted ``path\\0digest`` lines (and the kind)."""
    h = hashlib.sha256()
    h.update(kind.encode() + b"\n")
    for rel, digest in sorted(manifest.items()):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def folder_digest(folder: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> str:
    """Digest of a folder's content, ignoring lorakit's own metadata files named in ``exclude``."""
    manifest = {k: v for k, v in file_manifest(folder).items() if k not in exclude}
    return manifest_digest(manifest)
