"""Checkouts: plain folders that transformers and PEFT load, materialised from blobs and verified.

``resolve`` must hand back an ordinary folder (``from_pretrained`` knows nothing about blobs), so each artifact
digest gets ``<root>/checkouts/<digest>/`` built from hard links to its blobs (no copy, no extra space; a copy
where links are impossible). A checkout is built in a temporary sibling, every file is hashed against its blob
digest, and only then renamed into place, with a stamp (inode, size, mtime, ctime per file) beside it. Later
resolves compare the stamp, which costs a ``stat`` per file; any change (a write to a blob or through a link
changes ctime, which ``touch`` cannot reset) makes the files be hashed again, and corrupt bytes are refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from registry.blobs import CHUNK, TMP_PREFIX, BlobStore, hash_file
from registry.errors import CorruptArtifactError

StoredFile = tuple[str, str, int]  # (relative path, blob digest, size)


def safe_relpath(rel: str) -> PurePosixPath:
    """A stored relative path, refused if it could land outside the folder it is written into."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\\" in rel or "\0" in rel:
        raise CorruptArtifactError(f"the registry index holds an unsafe file path {rel!r}; run lorakit registry verify")
    return p


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def copy_verified(src: Path, dest: Path, digest: str, what: str) -> None:
    """Copy ``src`` to ``dest`` hashing on the way; a mismatch is corruption, never a silent bad copy."""
    h = hashlib.sha256()
    with open(src, "rb") as fh, open(dest, "wb") as out:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != digest:
        raise CorruptArtifactError(
            f"{what}: stored file for {dest.name} no longer matches its digest; run lorakit registry verify"
        )


class Checkouts:
    def __init__(self, root: Path, blobs: BlobStore) -> None:
        self.root = root / "checkouts"
        self.blobs = blobs

    def path(self, digest: str) -> Path:
        return self.root / digest

    def _stamp(self, digest: str) -> Path:
        return self.root / f"{digest}.stamp.json"

    def _stamp_matches(self, dest: Path, digest: str, files: list[StoredFile]) -> bool:
        try:
            stamp = json.loads(self._stamp(digest).read_text())
            present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() or p.is_symlink()}
            if present != {rel for rel, _, _ in files} or set(stamp) != present:
                return False
            return all(_stat_key(dest / rel) == stamp[rel] for rel, _, _ in files)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _write_stamp(self, dest: Path, digest: str, files: list[StoredFile]) -> None:
        stamp = {rel: _stat_key(dest / rel) for rel, _, _ in files}
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.root)
        with os.fdopen(fd, "w") as fh:
            json.dump(stamp, fh)
        os.replace(tmp, self._stamp(digest))

    def _content_ok(self, dest: Path, files: list[StoredFile]) -> bool:
        for rel, blob, size in files:
            path = dest / rel
            if path.is_symlink() or not path.is_file() or path.stat().st_size != size or hash_file(path) != blob:
                return False
        return True

    def materialize(self, digest: str, files: list[StoredFile], label: str, trusted: set[str] = frozenset()) -> Path:
        """The verified checkout folder of artifact ``digest`` (built on first use).

        ``trusted`` blobs are not re-hashed while building: registration passes the ones it has just written from
        files it hashed a moment before.
        """
        dest = self.path(digest)
        if dest.is_dir():
            if self._stamp_matches(dest, digest, files):
                return dest
            present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir()}
            if present == {rel for rel, _, _ in files} and self._content_ok(dest, files):
                self._write_stamp(dest, digest, files)
                return dest
            self._refuse_corrupt_blobs(files, label)
            # The blobs are fine but the checkout was edited: rebuild it from the blobs.
        return self._build(digest, files, label, trusted)

    def _refuse_corrupt_blobs(self, files: list[StoredFile], label: str) -> None:
        for rel, blob, size in files:
            problem = self.blobs.check(blob, size)
            if problem:
                raise CorruptArtifactError(
                    f"{label} is corrupt: the stored bytes of {rel} are {problem}; refusing to use it "
                    "(run lorakit registry verify; re-register the artifact from its source to repair)"
                )

    def _build(self, digest: str, files: list[StoredFile], label: str, trusted: set[str] = frozenset()) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.path(digest)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            for rel, blob, size in files:
                target = tmp / safe_relpath(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = self.blobs.path(blob)
                if not src.exists():
                    raise CorruptArtifactError(f"{label} is corrupt: the stored bytes of {rel} are missing; run lorakit registry verify")
                try:
                    os.link(src, target)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP):
                        raise
                    copy_verified(src, target, blob, label)
                if target.stat().st_size != size or (blob not in trusted and hash_file(target) != blob):
                    raise CorruptArtifactError(
                        f"{label} is corrupt: the stored bytes of {rel} no longer match their digest; refusing to use "
                        "it (run lorakit registry verify; re-register the artifact from its source to repair)"
                    )
            # No fsync here: a checkout is a cache of verified blobs; one lost to a power cut fails its stamp
            # check and is rebuilt.
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
                os.rename(dest, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, dest)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent resolve published the same content first
            self._write_stamp(dest, digest, files)
            return dest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def digests(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX))

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self._stamp(digest).unlink()

    def temporaries(self) -> list[Path]:
        return sorted(self.root.glob(f"{TMP_PREFIX}*")) if self.root.is_dir() else []
