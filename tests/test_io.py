"""Atomic outputs and the streaming safetensors reader/writer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as st_load, save_file as st_save

from lorakit.errors import InputError
from lorakit.io.atomic import atomic_dir
from lorakit.io.safetensors_stream import load_file, read_header, save_file
from tests.conftest import assert_nothing_written


def test_save_file_round_trips_through_the_reference_reader(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int32),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = st_load(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_load_file_reads_reference_files(tmp_path):
    tensors = {"w": torch.randn(4, 4), "h": torch.randn(2).half()}
    st_save(tensors, tmp_path / "y.safetensors")
    back = load_file(tmp_path / "y.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncation_is_detected(tmp_path, cut):
    st_save({"w": torch.randn(16, 16)}, tmp_path / "z.safetensors")
    data = (tmp_path / "z.safetensors").read_bytes()
    (tmp_path / "z.safetensors").write_bytes(data[:cut])
    with pytest.raises(InputError, match="truncated|corrupt|not a safetensors"):
        read_header(tmp_path / "z.safetensors")


def test_atomic_dir_publishes_only_complete_output(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert_nothing_written(dest)
    with atomic_dir(dest) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (dest / "done.txt").read_text() == "ok"
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700), "published folder must not keep mkdtemp's private mode"


def test_an_output_written_meanwhile_by_another_process_is_kept_not_replaced(tmp_path):
    """Two writers to one path, each having checked it was free: the first to finish publishes; the second, without
    force, is refused with the reason and leaves no temporary (with force it replaces, as asked)."""
    from lorakit.errors import OutputExistsError

    dest = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this output was being written"):
        with atomic_dir(dest) as tmp:
            (tmp / "mine.txt").write_text("mine")
            with atomic_dir(dest) as other:  # the other process, finishing first
                (other / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"]
    with atomic_dir(dest, force=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_cleaned_and_an_old_output_put_back(tmp_path):
    """What a SIGKILLed run leaves (tmp-PID and old-PID siblings) goes; live or foreign ones stay."""
    import os

    from lorakit.errors import OutputExistsError
    from lorakit.io.atomic import _owner, check_output_free

    dest = tmp_path / "out"
    host = _owner().partition("h")[2]
    dead = _dead_pid()
    stale_tmp = tmp_path / f".out.tmp-{dead}h{host}-abc"
    stale_old = tmp_path / f".out.old-{dead}h{host}-def"
    live_tmp = tmp_path / f".out.tmp-{os.getppid()}h{host}-ghi"  # our parent: alive
    foreign = tmp_path / f".out.tmp-{dead}h00000000-jkl"         # another host's: its PID means nothing here
    for d in (stale_tmp, stale_old / "x", live_tmp, foreign):
        d.mkdir(parents=True)
    (stale_old / "x" / "model.safetensors").write_text("the old output")
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output_free(dest, force=False)  # the killed --force run's old output is back, so it exists
    assert (dest / "model.safetensors").read_text() == "the old output"
    assert not stale_tmp.exists() and not stale_old.exists()
    assert live_tmp.exists() and foreign.exists()
    with atomic_dir(dest, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert (dest / "new").exists() and live_tmp.exists()
