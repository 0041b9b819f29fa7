"""A real SIGKILL of ``lorakit merge --output-kind model`` at random points of its write leaves no output.

The merge runs as a subprocess on a small random model (38 MB, so its write takes a measurable time). Each
run is killed at a seeded random delay after its temporary folder appeared, spread over the write window
measured on an uninterrupted run. After every kill the destination is absent, or complete and equal to an
uninterrupted merge (when the kill came after the rename); the only leftovers are temporaries named for the
dead process, which the next run removes before it writes, and the next run succeeds with the same bytes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.io.digests import folder_digest
from tests.conftest import REPO

KILLS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    from lorakit.models.synthetic import make_random_adapter
    from lorakit.models.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("kill")
    base = make_tiny_llama(root / "base", hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                           num_kv_heads=4, seed=0)
    make_random_adapter(base, root / "a", r=8, seed=1)
    make_random_adapter(base, root / "b", r=8, seed=2)
    return root


def _start(root: Path, out: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "merge", "a", "b", "-w", "0.6,0.4", "--output-kind", "model",
         "--base", "base", "-o", out, *extra], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _siblings(root: Path, out: str) -> list[str]:
    return sorted(p.name for p in root.glob(f".{out}.*"))


def _wait_for_temporary(proc: subprocess.Popen, root: Path, out: str) -> float:
    """Block until the run's temporary folder exists; return that moment."""
    while not _siblings(root, out):
        assert proc.poll() is None, f"merge ended before writing: {proc.stdout.read().decode()}"
        time.sleep(0.001)
    return time.perf_counter()


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()


def test_sigkill_at_random_points_leaves_no_output_and_next_run_succeeds(setup):
    root = setup
    # An uninterrupted run: the bytes every later run must reproduce, and the length of the write window.
    proc = _start(root, "ref")
    seen = _wait_for_temporary(proc, root, "ref")
    while not (root / "ref").exists() and proc.poll() is None:
        time.sleep(0.001)
    window = time.perf_counter() - seen
    _finish(proc)
    reference = folder_digest(root / "ref", exclude=("lorakit_merge.json",))
    assert _siblings(root, "ref") == []

    rng = random.Random(15)
    delays = sorted(rng.uniform(0.0, 1.0) * window for _ in range(KILLS))
    killed_mid_write = 0
    for i, delay in enumerate(delays):
        out = f"out{i}"
        proc = _start(root, out)
        start = _wait_for_temporary(proc, root, out)
        while time.perf_counter() - start < delay:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        leftovers = _siblings(root, out)
        if (root / out).exists():  # the kill came after the rename: the output is complete
            assert folder_digest(root / out, exclude=("lorakit_merge.json",)) == reference
            continue
        killed_mid_write += 1
        assert leftovers and all(name.startswith(f".{out}.tmp-{proc.pid}h") for name in leftovers), leftovers
        # The next run cleans what the killed one left and writes the same merge.
        _finish(_start(root, out))
        assert _siblings(root, out) == []
        assert folder_digest(root / out, exclude=("lorakit_merge.json",)) == reference
    print(f"\nwrite window {window:.3f} s, kill delays {[round(d, 3) for d in delays]}, mid-write {killed_mid_write}")
    assert killed_mid_write >= KILLS // 2, (
        f"only {killed_mid_write} of {KILLS} kills hit the write (window {window:.3f} s); the test proved little")


def test_sigkill_during_forced_replace_keeps_or_restores_the_old_output(setup):
    """With --force over an existing output, a kill at any point leaves the old output (in place, or moved
    aside and put back by the next run) or the new complete one -- never neither."""
    root = setup
    _finish(_start(root, "old-ref", "--weights", "0.2,0.8"))  # the "old" output: other weights
    old = folder_digest(root / "old-ref", exclude=("lorakit_merge.json",))
    _finish(_start(root, "new-ref"))
    new = folder_digest(root / "new-ref", exclude=("lorakit_merge.json",))
    assert old != new

    rng = random.Random(7)
    for i in range(3):
        out = f"forced{i}"
        _finish(_start(root, out, "--weights", "0.2,0.8"))
        proc = _start(root, out, "--force")
        start = _wait_for_temporary(proc, root, out)
        delay = rng.uniform(0.0, 0.2)
        while time.perf_counter() - start < delay:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # What the next run does first: put back an old output the killed run had moved aside, drop temporaries.
        check = subprocess.run([sys.executable, "-c", (
            "import sys; from lorakit.io.atomic import check_output_free; from pathlib import Path\n"
            f"check_output_free(Path({str(root / out)!r}), force=True)")],
            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert _siblings(root, out) == []
        assert folder_digest(root / out, exclude=("lorakit_merge.json",)) in (old, new)
