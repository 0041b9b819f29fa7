"""Content-addressed blob store: every file is kept once, under the sha256 of its bytes.

A blob is written to a temporary file in its final folder (after its source was hashed, and checked unchanged
after the copy), fsynced, and only then renamed into place. So a blob path either does not exist or holds exactly
the bytes its name promises; a crash leaves at most a ``.tmp-*`` file that ``gc`` removes. Blobs are made
read-only to discourage editing them through a checkout's hard links (``verify`` catches it anyway).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import InputError, LorakitError
from lorakit.io.atomic import fsync_dir
from lorakit.io.digests import sha256_file as hash_file

CHUNK = 8 << 20
TMP_PREFIX = ".tmp-"


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class BlobStore:
    """``<root>/sha256/ab/abcdef...``: two-character fan-out keeps folders small for large registries."""

    def __init__(self, root: Path) -> None:
        self.root = root / "sha256"

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise LorakitError(f"invalid blob digest {digest!r} in the registry index; run lorakit registry verify")
        return self.root / digest[:2] / digest

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def put(self, src: Path, digest: str, stat_when_hashed: os.stat_result | None = None, *, replace: bool = False) -> bool:
        """Store ``src`` as blob ``digest`` unless it is already there; True when bytes were written.

        The caller hashed ``src`` just before; the copy is a kernel copy (``copy_file_range``, as fast as
        ``cp``), and the source's inode, size and mtime must be unchanged afterwards, so a file edited during
        registration is refused instead of producing a blob whose name lies about its content. ``replace``
        rewrites a blob found corrupt from a source known to hash right.
        """
        dest = self.path(digest)
        if dest.exists() and not replace:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if stat_when_hashed is not None and _identity(src.stat()) != _identity(stat_when_hashed):
                raise InputError(f"{src} changed while it was being registered; register it again once it is stable")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)  # identical content under the same name: a concurrent writer's copy is as good
            fsync_dir(dest.parent)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno == errno.ENOSPC:
                raise InputError(f"no space left on the device while storing {src} in the registry; free space and retry") from exc
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def check(self, digest: str, size: int) -> str | None:
        """None when blob ``digest`` exists with the right size and bytes, else what is wrong with it."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        if st.st_size != size:
            return f"size {st.st_size} != {size}"
        actual = hash_file(path)
        return None if actual == digest else f"content hashes to {actual[:12]}"

    def digests(self) -> Iterator[str]:
        """Every complete blob on disk (temporaries excluded)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if not p.name.startswith(TMP_PREFIX):
                        yield p.name

    def temporaries(self) -> Iterator[Path]:
        """Leftovers of interrupted writes (only safe to delete while holding the exclusive lock)."""
        if self.root.is_dir():
            yield from self.root.glob(f"*/{TMP_PREFIX}*")

    def remove(self, digest: str) -> int:
        path = self.path(digest)
        size = path.stat().st_size
        path.unlink()
        return size
