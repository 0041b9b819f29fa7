"""The layers bench's bookkeeping: the recipe it hands `lorakit train` is the release's, option for option, and an
adapter trained another way (other data, another learning rate, another layers spec) is refused, not compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.train_layers import check_recipe, cli_args, readme
from flows.config import ReleaseConfig
from flows.plan import ReleasePlan
from lorakit.cli.options import take_stage_options
from lorakit.cli.train_cmd import train
from lorakit.train.options import TrainOptions


def _release_params() -> dict:
    cfg = ReleaseConfig()
    plan = ReleasePlan(cfg)
    return plan.train(cfg.datasets[1], "prep")["params"]  # number-words: its own lr and steps over the run's


def test_the_release_recipe_reaches_lorakit_train_unchanged():
    """Parsed by the real `lorakit train` command: every option the release trains with, as the release has it,
    but the layers spec and the steps of a timing run."""
    params = _release_params()
    ctx = train.make_context("train", ["prep", "-o", "out", *cli_args(params, "top:15", steps=7)])
    with ctx:  # what the command hands train_adapter: the typed options, as TrainOptions reads them
        fields = {k: v for k, v in ctx.params.items() if k in TrainOptions.model_fields}
        got = {**take_stage_options(TrainOptions, fields).model_dump(), "base": ctx.params["base"],
               "compute_dtype": ctx.params["compute_dtype"]}
    assert got["layers"] == "top:15" and got["max_steps"] == 7 and got["epochs"] is None
    assert got["checkpoint_every"] is None and got["min_loss_drop"] is None
    for key, value in params.items():
        if key in ("layers", "max_steps", "epochs", "checkpoint_every", "min_loss_drop", "progress"):
            continue
        assert got[key] == value, key


def _adapter(tmp_path: Path, digest: str = "d1", **config) -> tuple[Path, Path]:
    prep = tmp_path / "prep"
    prep.mkdir(exist_ok=True)
    (prep / "prep.json").write_text(json.dumps({"data_digest": "d1"}))
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    record = {"prep": {"digest": digest, "path": "elsewhere"}, "config": {**_release_params(), **config}}
    (folder / "lorakit_train.json").write_text(json.dumps(record))
    return prep, folder


def test_an_adapter_of_the_recipe_is_taken(tmp_path):
    prep, folder = _adapter(tmp_path, layers="top:10", checkpoint_every=None)
    assert check_recipe("top:10", folder, str(prep), _release_params())["config"]["layers"] == "top:10"


@pytest.mark.parametrize("kw, spec, fragment", [
    (dict(lr=0.01), "all", "other lr"),
    (dict(digest="d2"), "all", "other data"),
    (dict(layers="top:15"), "top:10", "trained with layers 'top:15'"),
])
def test_an_adapter_trained_otherwise_is_refused(tmp_path, kw, spec, fragment):
    digest = kw.pop("digest", "d1")
    prep, folder = _adapter(tmp_path, digest=digest, **kw)
    with pytest.raises(SystemExit, match=fragment):
        check_recipe(spec, folder, str(prep), _release_params())


def test_readme_shows_time_and_answers():
    data = {"benchmark": "train_layers", "task": "reverse-words", "usage": "python bench/train_layers.py",
            "machine": {"cpu": {"model": "Some CPU", "flags": ["avx2"], "kernel_env": {}}},
            "time": {"steps_per_run": 12, "loadavg_at_end": 2.0, "step_s": {"all": 6.0, "top:15": 4.0},
                     "speedup_vs_all": {"all": 1.0, "top:15": 1.5}},
            "trained": {s: {"wall_time_s": 1000.0, "steps": 360, "threads": 1} for s in ("all", "top:15")},
            "accuracy": {"all": {"test": {"exact_match": 0.95}, "fresh": {"exact_match": 0.9},
                                 "general_text": {"vs_base": 0.05}},
                         "top:15": {"test": {"exact_match": 0.94}, "fresh": {
                             "exact_match": 0.89, "vs_all": {"lost": 30, "gained": 10, "p_value": 0.002,
                                                             "drop_ci95": [0.004, 0.016]}},
                                    "general_text": {"vs_base": 0.02}}}}
    text = readme(data)
    assert "| top:15 | 4.00 | 1.50x |" in text
    assert ("| top:15 | 1000 s (360 steps, 1 thread) | 94.0% | 89.0% | 30 / 10 (p 0.002; 0.4 to 1.6 points) "
            "| +2.0% |") in text
    assert "| all | 1000 s (360 steps, 1 thread) | 95.0% | 90.0% | — | +5.0% |" in text
