"""Atomic outputs: a folder or file appears complete under its final name, or not at all.

Every lorakit step writes into a hidden temporary sibling of the destination (same filesystem, so the final
``rename`` is atomic) and renames it into place only after everything was written and fsynced. An interrupted
run, a full disk or an exception leaves the destination untouched and removes the temporary.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import InputError, OutputExistsError


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (a rename is durable only once its parent folder is flushed)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` so the rename that follows publishes durable data."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_free(dest: Path, force: bool) -> None:
    """Refuse an existing destination before any work starts, so a long job never fails at its end."""
    if dest.exists() and not force:
        raise OutputExistsError(f"output {dest} already exists; choose another path or pass --force to replace it")


def _disk_full_message(dest: Path) -> str:
    return f"no space left on the device while writing {dest}; free some space and run again (nothing was written)"


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``dest`` when the block completes without error."""
    dest = Path(dest)
    check_output_free(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's private 0700 would leak into the published folder
    try:
        yield tmp
        fsync_tree(tmp)
        if dest.exists():
            # Move the old output aside first so that a failure between the two renames keeps it.
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise InputError(_disk_full_message(dest)) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``dest`` when the block completes without error.

    For large single-file outputs (a GGUF) that are written by a library into a path: the file is fsynced and
    renamed into place only when complete; an exception or a full disk removes the temporary.
    """
    dest = Path(dest)
    check_output_free(dest, force)
    if dest.is_dir():
        raise InputError(f"output {dest} is a folder; pass a file path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise InputError(_disk_full_message(dest)) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    """Write a small file atomically (temp file in the same folder, fsync, rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise InputError(_disk_full_message(dest)) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically with a stable layout that diffs well."""
    atomic_write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON ({exc}); it may be truncated or corrupt") from None
