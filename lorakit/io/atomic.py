"""Atomic outputs: a folder or file appears complete under its final name, or not at all.

Every lorakit step writes into a hidden temporary sibling of the destination (same filesystem, so the final
``rename`` is atomic) and renames it into place only after everything was written and fsynced. An interrupted
run, a full disk or an exception leaves the destination untouched and removes the temporary. A run killed
outright (SIGKILL, power loss) cannot clean up after itself: its temporaries carry its process id
(``.NAME.tmp-PIDhHOST-*``), and the next atomic write to the same destination removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import zlib
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


def _disk_full_message(dest: Path) -> str:
    return f"no space left on the device while writing {dest}; free some space and run again (nothing was written)"


def _owner() -> str:
    """This process as it appears in temporary names: PID and a tag of the host (PIDs are per host/container)."""
    return f"{os.getpid()}h{zlib.crc32(socket.gethostname().encode()):08x}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale_siblings(dest: Path, kind: str) -> list[Path]:
    """``.NAME.KIND-PIDhHOST-*`` siblings of ``dest`` made on this host by a process that no longer runs.

    Names of another form, of another host, or of a live process are left alone.
    """
    prefix = f".{dest.name}.{kind}-"
    host = _owner().partition("h")[2]
    stale = []
    with contextlib.suppress(FileNotFoundError):
        for entry in dest.parent.iterdir():
            if not entry.name.startswith(prefix) or "-" not in entry.name[len(prefix):]:
                continue
            pid, _, tag = entry.name[len(prefix):].split("-", 1)[0].partition("h")
            if pid.isdigit() and tag == host and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                stale.append(entry)
    return sorted(stale)


def clean_stale_temporaries(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left beside ``dest``; return what was removed.

    A ``--force`` run killed between moving the old output aside and renaming the new one in leaves ``dest``
    missing and the old output in ``.NAME.old-PIDhHOST-*/x``: that old output is put back first, so a killed run
    never costs the previous result.
    """
    dest = Path(dest)
    for old in _stale_siblings(dest, "old"):
        if not dest.exists() and (old / "x").exists():
            os.rename(old / "x", dest)
    removed = _stale_siblings(dest, "tmp") + _stale_siblings(dest, "old")
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return removed


def check_output_free(dest: Path, force: bool) -> None:
    """Refuse an existing destination before any work starts, so a long job never fails at its end.

    What killed runs left beside it is cleaned (and an old output they had moved aside put back) first.
    """
    clean_stale_temporaries(dest)
    if Path(dest).exists() and not force:
        raise OutputExistsError(f"output {dest} already exists; choose another path or pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``dest`` when the block completes without error."""
    dest = Path(dest)
    check_output_free(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{_owner()}-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's private 0700 would leak into the published folder
    try:
        yield tmp
        fsync_tree(tmp)
        if dest.exists() and not force:
            raise _appeared(dest)
        if dest.exists():
            # Move the old output aside first so that a failure between the two renames keeps it.
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{_owner()}-", dir=dest.parent))
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
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and not force:  # it appeared between the check and rename
            raise _appeared(dest) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _appeared(dest: Path) -> OutputExistsError:
    """``dest`` was free when the work started and exists now: another process wrote it meanwhile. Without
    ``force`` it is theirs to keep: this output is discarded rather than replacing it unasked."""
    return OutputExistsError(f"output {dest} appeared while this output was being written (another process wrote it); "
                             "it was kept and this output discarded: choose another path, or pass --force to replace it")


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
    with _replaced_via_temp(dest) as tmp:
        yield tmp


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    """Write a small file atomically (temp file in the same folder, fsync, rename), replacing any old one."""
    with _replaced_via_temp(Path(dest)) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def _replaced_via_temp(dest: Path) -> Iterator[Path]:
    """A temporary sibling of ``dest`` that is fsynced and renamed over it when the block succeeds, removed when
    it fails (a full disk becomes the one-line disk-full error)."""
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
