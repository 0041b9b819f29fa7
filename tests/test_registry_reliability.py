"""Registry under crashes and contention: kill -9 mid-registration, 16 concurrent writers, gc vs. writers.

Workers are real processes (tests/registry_worker.py) that import only ``registry`` and the standard library.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.io.digests import file_manifest, manifest_digest
from registry import Registry, RegistryBusyError

WORKER = Path(__file__).with_name("registry_worker.py")


def _artifact(folder: Path, rng: random.Random, n_files: int = 6, size: int = 96 << 10) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": rng.random()}))
    for i in range(n_files):
        (folder / f"shard-{i}.safetensors").write_bytes(rng.randbytes(size))
    return folder


def _digest(folder: Path, kind: str = "base") -> str:
    return manifest_digest(file_manifest(folder), kind)


def _spawn(*args: str, stdin=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=stdin, text=True)


def _assert_complete(reg: Registry, sources: dict[str, Path]) -> None:
    """Every listed version resolves to exactly the bytes of the folder it was registered from."""
    for v in reg.list():
        assert v.digest in sources, f"{v.ref} has a digest no source folder has"
        assert file_manifest(reg.resolve(v.ref)) == file_manifest(sources[v.digest])


def test_kill_9_during_registration_leaves_nothing_or_complete(tmp_path):
    rng = random.Random(20261126)
    root = tmp_path / "reg"
    sources: dict[str, Path] = {}

    def trial_folders(t: int) -> list[str]:
        folders = [_artifact(tmp_path / "src" / f"t{t}-{k}", rng) for k in range(3)]
        for f in folders:
            sources[_digest(f)] = f
        return [str(f) for f in folders]

    # Calibrate: how long one registration takes here, once the worker is ready.
    proc = _spawn("register", str(root), "calib", *trial_folders(0))
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    for i in (1, 2, 3):
        assert proc.stdout.readline().strip() == f"registered {i}", proc.stderr.read()
    step = (time.monotonic() - t0) / 3
    assert proc.stdout.readline().strip() == "done"
    proc.wait()

    outcomes = []
    for t in range(1, 23):
        name = f"trial{t}"
        proc = _spawn("register", str(root), name, *trial_folders(t))
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        # Aim at registration k+1 by the worker's own progress, then kill at a random moment inside it, timed
        # by how long this trial's previous registration took (load from other tests slows both alike).
        k = t % 3
        last = time.monotonic()
        for i in range(1, k + 1):
            assert proc.stdout.readline().strip() == f"registered {i}", proc.stderr.read()
            now = time.monotonic()
            step, last = now - last, now
        time.sleep(rng.uniform(0, step))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        reg = Registry(root)
        report = reg.verify()
        assert report.ok, report.problems
        versions = reg.list(name)
        assert [v.version for v in versions] == list(range(1, len(versions) + 1))
        assert len(versions) >= k, "a registration the worker reported done was lost"
        _assert_complete(reg, sources)
        outcomes.append(len(versions))
        reg.close()
    # The random kill points must actually have landed inside registrations, not only before or after them.
    assert any(0 < n < 3 for n in outcomes), outcomes

    reg = Registry(root)
    collected = reg.gc()
    after = reg.verify()
    assert after.ok and not after.orphan_blobs and after.temporaries == 0
    _assert_complete(reg, sources)
    print(f"versions per killed trial: {outcomes}; gc removed {len(collected.blobs)} orphan blobs, "
          f"{collected.temporaries} temporaries")


def test_16_processes_register_and_alias_concurrently(tmp_path):
    rng = random.Random(7)
    root = tmp_path / "reg"
    # No index yet: the 16 processes also race to create and migrate it.
    flag = tmp_path / "go"
    common = _artifact(tmp_path / "common", rng, n_files=2, size=4096)
    procs = []
    for i in range(16):
        folders = [str(_artifact(tmp_path / f"p{i}-{k}", rng, n_files=2, size=8192)) for k in range(3)]
        procs.append(_spawn("concurrent", str(root), str(flag), str(i), str(common), *folders))
    flag.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "locked" not in err.lower(), err
        results.append(json.loads(out))

    reg = Registry(root)
    shared = reg.list("shared")
    assert [v.version for v in shared] == list(range(1, 49)), "versions must be 1..48 with no duplicates or gaps"
    assert len({v.digest for v in shared}) == 48
    by_ref = {v.ref: v.digest for v in shared}
    for r in results:
        for item in r["results"]:
            assert by_ref[item["shared"]] == item["digest"]
            assert reg.get(item["own"]).digest == item["digest"]
    assert [v.ref for v in reg.list("common")] == ["common@1"]
    assert {r["common"] for r in results} == {"common@1"}
    history = reg.alias_history("shared", "candidate")
    assert len(history) == 48
    assert reg.get("shared@candidate").version == history[-1].version
    assert reg.verify().ok


def test_gc_never_runs_while_another_process_holds_the_write_lock(tmp_path):
    rng = random.Random(3)
    reg = Registry(tmp_path / "reg")
    kept = reg.register(_artifact(tmp_path / "kept", rng), name="kept", kind="base")
    orphan_src = tmp_path / "orphan.bin"
    orphan_src.write_bytes(rng.randbytes(1000))
    orphan = _digest_file(orphan_src)
    reg.blobs.put(orphan_src, orphan)  # what a registration leaves between its blobs and its commit

    holder = _spawn("hold-lock", str(reg.root), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryBusyError, match="another process is writing"):
            reg.gc(wait_s=0.2)
        assert reg.blobs.has(orphan)
        assert reg.gc(dry_run=True).blobs == [orphan]  # a dry run reports without the lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()

    report = reg.gc(wait_s=5)
    assert report.blobs == [orphan] and report.freed_bytes == 1000
    assert not reg.blobs.has(orphan)
    assert reg.verify().ok
    assert file_manifest(reg.resolve(kept.ref)) == file_manifest(tmp_path / "kept")


def _digest_file(path: Path) -> str:
    from lorakit.io.digests import sha256_file

    return sha256_file(path)
