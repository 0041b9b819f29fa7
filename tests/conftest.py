"""Shared fixtures: tiny random models made in code (fast), and the real embedded default (slow tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Quiet, predictable runs: no telemetry, no hub access attempts, threads sized for a 2-core CI machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs two workers) the cores are shared: each worker, and the processes its tests
# start, compute on its share of them rather than every worker on all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "LORAKIT_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["LORAKIT_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from lorakit.runtime import configure_threads  # noqa: E402

configure_threads()

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``lorakit`` CLI in a subprocess (this checkout's code first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"lorakit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 128, untied embeddings) saved as an HF folder with a byte tokenizer."""
    from lorakit.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_base(tmp_path_factory) -> Path:
    from lorakit.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-tied", tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def real_base() -> Path:
    """The embedded default SmolLM2-135M-Instruct (converted once into $LORAKIT_HOME)."""
    from lorakit.models import ensure_default_model

    return ensure_default_model()


def assert_nothing_written(path: Path) -> None:
    """The output does not exist and no temporary sibling was left behind."""
    assert not path.exists(), f"{path} was created"
    leftovers = [p.name for p in path.parent.glob(f".{path.name}.*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# The files that took longest in a measured run (`pytest --durations=0`, summed per file, 2-core machine), longest
# first; the rest keep pytest's order after them.
LONG_FILES = ["test_gpu_check.py", "test_release_flow.py", "test_export_slow.py", "test_release_deploy.py",
              "test_progress.py", "test_quantize.py", "test_preflight.py", "test_registry_cli.py",
              "test_gate_distribution.py", "test_scorecard.py", "test_evaluate.py", "test_merge_kill.py"]


def pytest_collection_modifyitems(config, items) -> None:
    """The long files first, each file's tests in their own order. `make test` hands whole files to two
    pytest-xdist workers in this order: the minutes-long files start at once and the many short ones fill the gaps,
    instead of one worker running a long file alone at the end while the other idles."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: ties keep pytest's order


# --- evaluation / gate (issue 5) -------------------------------------------------------------------------------

def make_eval_text(n_words: int = 120, seed: int = 0) -> str:
    """Deterministic English-like text; with the tiny models' byte tokenizer every byte is one token."""
    import random

    words = ["the", "model", "reads", "a", "short", "line", "of", "text", "and", "predicts", "next", "token",
             "while", "we", "measure", "how", "surprised", "it", "is", "by", "each", "word"]
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words)) + "."


def make_prep_dir(path: Path, val_texts: list[str], train_texts: list[str] | None = None) -> Path:
    """A prepared-data folder by hand, following lorakit/data/splits.py (until `lorakit prep` exists)."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "prep.json").write_text(json.dumps({"made_by": "tests"}))
    for split, texts in (("val", val_texts), ("train", train_texts or val_texts)):
        with open(path / f"{split}.texts.jsonl", "w", encoding="utf-8") as fh:
            for t in texts:
                fh.write(json.dumps({"text": t}) + "\n")
    return path


# --- tasks a tiny model really learns (scorecard, merge search) -------------------------------------------------

ANSWER_TRAINING = dict(quant="none", r=8, alpha=16, lr=0.01, max_steps=30, batch_size=8, grad_accum=1, progress=False,
                       checkpoint_every=None, min_loss_drop=None)


def write_answer_data(path: Path, instruction: str, answer: str, n: int = 60) -> Path:
    """``n`` instruction rows that all have the same answer (JSONL, the instruction format)."""
    import json

    path.write_text("".join(json.dumps({"instruction": instruction, "input": f"item {i}", "output": answer}) + "\n"
                            for i in range(n)))
    return path


def train_answer_tasks(root: Path, base: Path, answers: dict[str, str], n: int = 60) -> dict[str, tuple[Path, Path]]:
    """{name: (prep, adapter)} for trivial instruction tasks ("Answer yes." -> "yes"), each learned by a LoRA adapter
    trained with lorakit's own trainer on the tiny base: 100% exact match after 30 steps; the random base answers
    garbage (0%). Each adapter learns to say its answer whatever the prompt, so two of them conflict in a merge."""
    from lorakit.data.prep import prepare_dataset
    from lorakit.train import train_adapter

    out = {}
    for name, instruction in answers.items():
        src = write_answer_data(root / f"{name}.jsonl", instruction, name, n)
        prep = prepare_dataset([src], root / f"prep-{name}", base=base, max_length=64, progress=False).output
        out[name] = (prep, train_adapter(prep, root / f"adapter-{name}", **ANSWER_TRAINING).output)
    return out


# --- Prefect (flows issue) ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for every in-process flow test (its cold start is 25-45 s here).

    Yields the folder that holds persisted task results (and so the cache), which other processes can share.
    """
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_LOGGING_LEVEL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage, PREFECT_LOGGING_LEVEL: "WARNING"}):
        with prefect_test_harness(server_startup_timeout=120):
            yield storage
