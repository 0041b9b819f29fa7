"""Training in a child process (how several adapters train at once): same adapter, its lines, its failures."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit import progress
from lorakit.errors import InputError, LorakitError
from tests.conftest import ANSWER_TRAINING, write_answer_data

FAST = {**ANSWER_TRAINING, "max_steps": 4, "quant": "nf4"}


@pytest.fixture(scope="module")
def prep(tiny_base, tmp_path_factory):
    from lorakit.data.prep import prepare_dataset

    root = tmp_path_factory.mktemp("child")
    src = write_answer_data(root / "yes.jsonl", "Answer yes.", "yes", 40)
    return prepare_dataset([src], root / "prep", base=tiny_base, max_length=64, progress=False).output


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_child_trains_the_same_adapter_as_this_process(prep, tiny_base, tmp_path):
    from lorakit.train import train_adapter, train_in_child

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child below trains at one thread: compare like with like
    try:
        here = train_adapter(prep, tmp_path / "here", base=tiny_base, **FAST)
    finally:
        torch.set_num_threads(threads)
    lines: list[str] = []
    with progress.reporting(lines.append):
        child = train_in_child(prep, tmp_path / "child", threads=1, label="train yes", base=tiny_base,
                               **{**FAST, "progress": True})
    assert child.steps == here.steps == 4 and child.final_loss == pytest.approx(here.final_loss, abs=0)
    ours, theirs = adapter_tensors(here.output), adapter_tensors(child.output)
    assert ours.keys() == theirs.keys()
    for name in ours:  # same seed, same thread count, own random stream: bit for bit
        assert torch.equal(ours[name], theirs[name]), name
    assert child.metadata["steps"] == 4 and child.metadata["base_digest"] == here.metadata["base_digest"]
    assert child.metadata["torch_threads"] == here.metadata["torch_threads"] == 1
    assert child.metadata["peak_rss_mib"] > 0 and here.metadata["peak_rss_mib"] > 0
    # the child's progress reaches the parent's sink, labelled
    assert any(line.startswith("train yes: training: step 4/4, loss") for line in lines), lines


def test_child_error_keeps_its_class_message_and_exit_code(tiny_base, tmp_path):
    from lorakit.train import train_in_child

    with pytest.raises(InputError) as caught:
        train_in_child(tmp_path / "no-such-prep", tmp_path / "out", threads=1, base=tiny_base, **FAST)
    assert "no-such-prep" in str(caught.value) and caught.value.exit_code == InputError.exit_code
    assert not (tmp_path / "out").exists()


def test_a_killed_child_is_reported_and_leaves_no_adapter(prep, tiny_base, tmp_path):
    from lorakit.train import train_in_child

    outcome: dict[str, BaseException] = {}

    def train():
        try:
            train_in_child(prep, tmp_path / "out", threads=1, base=tiny_base, **{**FAST, "max_steps": 10_000})
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    worker = threading.Thread(target=train)
    worker.start()
    deadline = time.monotonic() + 60
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # let it reach the training loop
    [child] = [p for p in multiprocessing.active_children() if p.name.startswith("lorakit-train-")]
    os.kill(child.pid, signal.SIGKILL)
    worker.join(60)
    err = outcome.get("error")
    assert isinstance(err, LorakitError) and "died in its process (exit code -9: killed" in str(err), err
    assert not (tmp_path / "out").exists()


def test_a_child_stops_when_its_parent_is_killed(prep, tiny_base, tmp_path):
    """A parent killed by SIGKILL runs no cleanup: its training child must notice and stop, not train on alone."""
    import subprocess
    import sys
    import textwrap

    import psutil

    kwargs = {**FAST, "max_steps": 10_000, "base": str(tiny_base)}
    script = textwrap.dedent(f"""
        from lorakit.train import train_in_child
        train_in_child({str(prep)!r}, {str(tmp_path / "out")!r}, threads=1, **{kwargs!r})
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, child = time.monotonic() + 120, None
        while child is None and time.monotonic() < deadline and parent.poll() is None:
            spawned = [p for p in psutil.Process(parent.pid).children()
                       if "spawn_main" in " ".join(p.cmdline())]
            child = spawned[0] if spawned else None
            time.sleep(0.2)
        assert child is not None, f"no training child started: {parent.poll()} {parent.stderr.read()[-2000:]!r}"
        time.sleep(5)  # into its imports or its training loop
        assert child.is_running()
        parent.kill()
        parent.wait(10)
        child.wait(timeout=30)  # psutil.TimeoutExpired here = the child outlived its parent
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and child.is_running():  # a failed run must not leave a training behind in CI
            child.kill()
        parent.stderr.close()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code,says,advice", [(-9, "killed, perhaps for memory", "Train fewer adapters at once"),
                                               (137, "killed, perhaps for memory", "Train fewer adapters at once"),
                                               (-11, "before it could report why", "trains in this process"),
                                               (1, "before it could report why", "trains in this process")])
def test_a_dead_childs_advice_follows_its_exit_code(code, says, advice):
    """Out of memory (SIGKILL) asks for fewer trainings at once; any other silent exit points at the serial path,
    where the error shows; neither advice is given for the other."""
    from lorakit.train.child import death_message

    msg = death_message("adapters/x", code)
    assert f"(exit code {code}" in msg and says in msg and advice in msg
    other = "trains in this process" if "fewer" in advice else "Train fewer adapters at once"
    assert other not in msg


def test_threads_must_be_positive(tmp_path):
    from lorakit.train import train_in_child

    with pytest.raises(ValueError, match="threads must be >= 1"):
        train_in_child(tmp_path, tmp_path / "out", threads=0)


@pytest.mark.parametrize("requested,adapters,cores,device,want", [
    ("auto", 2, 2, "cpu", (2, 1)),      # the 2-core default: both at once, a thread each
    ("auto", 2, 16, "cpu", (2, 8)),     # the cores split evenly
    ("auto", 3, 2, "cpu", (2, 1)),      # never more at once than cores
    ("auto", 2, 1, "cpu", (1, None)),   # one core: one after another, in-process
    ("auto", 2, 8, "cuda", (1, None)),  # one device: one at a time
    (1, 2, 8, "cpu", (1, None)),
    (4, 2, 8, "cpu", (2, 4)),           # at most one per adapter
    (3, 3, 2, "cpu", (3, 1)),           # an explicit number is used as given, at least a thread each
])
def test_training_slots(requested, adapters, cores, device, want):
    from lorakit.runtime import training_slots

    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        assert training_slots(requested, adapters, device) == want
    finally:
        torch.set_num_threads(before)


def test_train_concurrency_config_refuses_nonsense():
    from flows.config import parse_config

    assert parse_config({"train_concurrency": 2}).train_concurrency == 2
    for bad in (0, -1, "many"):
        with pytest.raises(InputError, match="train_concurrency"):
            parse_config({"train_concurrency": bad})


def test_auto_trains_only_as_many_at_once_as_memory_holds():
    from lorakit.runtime import TRAIN_PEAK_PER_WEIGHT_BYTE, training_slots

    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        weights = 538_090_408  # the embedded model's float32 file
        one = TRAIN_PEAK_PER_WEIGHT_BYTE * weights
        assert training_slots("auto", 4, "cpu", base_weight_bytes=weights, available_bytes=int(2.5 * one)) == (2, 4)
        assert training_slots("auto", 4, "cpu", base_weight_bytes=weights, available_bytes=int(0.5 * one)) == (1, None)
        assert training_slots(3, 4, "cpu", base_weight_bytes=weights, available_bytes=int(0.5 * one)) == (3, 2)
    finally:
        torch.set_num_threads(before)
