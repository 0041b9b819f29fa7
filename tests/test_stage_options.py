"""One declaration per default: each stage's options model (lorakit.options) is what its CLI command, its run-config
section and its library function default to, and choice lists come from their owners.

The comparisons read each side where it lives (click's parameters, pydantic's fields, ``inspect.signature``), so a
default changed in one place only fails here.
"""

from __future__ import annotations

import inspect
import json

import click
import click.testing
import pytest

from lorakit.errors import InputError
from tests.conftest import assert_nothing_written, run_cli


def _stages():
    from flows.config import DatasetConfig, GateConfig, LoraConfig, MergeConfig, MergeSearchConfig, QuantizeConfig, \
        ScorecardConfig
    from lorakit.cli.eval_cmd import gate
    from lorakit.cli.merge_cmd import merge
    from lorakit.cli.prep_cmd import prep
    from lorakit.cli.quantize_cmd import quantize
    from lorakit.cli.scorecard_cmd import scorecard
    from lorakit.cli.train_cmd import train
    from lorakit.data.options import PrepOptions
    from lorakit.gate.options import GateOptions
    from lorakit.merge.options import MergeOptions, MergeSearchOptions
    from lorakit.quantize.options import QuantizeOptions
    from lorakit.scorecard.options import ScorecardOptions
    from lorakit.train.options import TrainOptions

    return {  # stage -> (options model, CLI command, run-config section)
        "prep": (PrepOptions, prep, DatasetConfig),
        "train": (TrainOptions, train, LoraConfig),
        "merge": (MergeOptions, merge, MergeConfig),
        "merge-search": (MergeSearchOptions, merge, MergeSearchConfig),
        "quantize": (QuantizeOptions, quantize, QuantizeConfig),
        "gate": (GateOptions, gate, GateConfig),
        "scorecard": (ScorecardOptions, scorecard, ScorecardConfig),
    }


def _library():
    from lorakit.data.prep import prepare_dataset
    from lorakit.gate.core import check
    from lorakit.merge import merge_adapters
    from lorakit.merge.search import search_merge
    from lorakit.quantize import quantize_model
    from lorakit.scorecard import build_scorecard
    from lorakit.train import train_adapter

    return {"prep": [prepare_dataset], "train": [train_adapter], "merge": [merge_adapters],
            "merge-search": [search_merge], "quantize": [quantize_model], "gate": [check],
            "scorecard": [build_scorecard]}


# Where the release deliberately differs from the command's default, and why (flows/config.py says it with numbers):
# RegMean needs every adapter's task data, which a release always has and a bare `lorakit merge a b` does not;
# scale tuning costs minutes a plain `lorakit quantize` need not spend, and buys back the answers a release is judged on.
RELEASE_CHOICES = {("merge", "method"): "regmean", ("merge", "regmean_anchor"): 1.0, ("quantize", "tune_steps"): 100}


def _default(field):
    return field.get_default(call_default_factory=True)


@pytest.mark.parametrize("stage", ["prep", "train", "merge", "merge-search", "quantize", "gate", "scorecard"])
def test_cli_options_and_config_section_are_the_options_model(stage):
    model, command, section = _stages()[stage]
    assert issubclass(section, model)
    params = {p.name: p for p in command.params}
    for name, field in model.model_fields.items():
        # the config section keeps every key with the same default, but for the release's declared choices
        assert _default(section.model_fields[name]) == RELEASE_CHOICES.get((stage, name), _default(field)), (stage, name)
        # the CLI has the option, with the declared default (lists as comma-separated text) and the field's help
        option = params[name]
        expected = _default(field)
        if isinstance(expected, list):
            expected = ",".join(map(str, expected))
        assert option.default == expected, (stage, name, option.default)
        assert (field.description or "")[5:40].lower() in (option.help or "").lower(), (stage, name)


@pytest.mark.parametrize("stage", ["prep", "train", "merge", "merge-search", "quantize", "gate", "scorecard"])
def test_library_defaults_are_the_options_model(stage):
    model = _stages()[stage][0]
    checked = 0
    for function in _library()[stage]:
        signature = inspect.signature(function).parameters
        for name, field in model.model_fields.items():
            if name in signature and signature[name].default is not inspect.Parameter.empty:
                if stage == "merge-search" and name in ("max_trials", "time_budget_s"):
                    continue  # None there means "the declared default" (checked below)
                declared = _default(field)
                default = list(signature[name].default) if isinstance(declared, list) else signature[name].default
                assert default == declared, (stage, function.__name__, name)
                checked += 1
    assert checked, stage


def test_search_merge_bounds_and_quantize_bounds_are_declared_once():
    from lorakit.merge import search as merge_search
    from lorakit.merge.options import MERGE_SEARCH
    from lorakit.quantize.options import QUANTIZE
    from lorakit.quantize.search import SearchBounds

    assert (merge_search.DEFAULT_MAX_TRIALS, merge_search.DEFAULT_TIME_BUDGET_S) == (
        MERGE_SEARCH.max_trials, MERGE_SEARCH.time_budget_s)
    assert (SearchBounds().max_trials, SearchBounds().time_budget_s) == (QUANTIZE.max_trials, QUANTIZE.time_budget_s)


def test_choice_lists_come_from_their_owners():
    from flows.config import DatasetConfig, ExportConfig, MergeConfig, MergeSearchConfig, QuantizeConfig
    from lorakit.cli.export_cmd import export
    from lorakit.cli.merge_cmd import merge
    from lorakit.cli.registry_cmd import ls_cmd as registry_list
    from lorakit.data.bundled import BUNDLED_NAMES
    from lorakit.export.gguf import GGUF_TYPES as WRITER_TYPES
    from lorakit.merge.registry import METHODS
    from lorakit.quantize.checks import METHODS as QUANT_METHODS
    from registry.metadata import KINDS

    def choices(command, name):
        param = next(p for p in command.params if p.name == name)
        t = getattr(param.type, "inner", param.type)
        t = getattr(t, "item", t)
        return list(t.choices)

    assert choices(merge, "method") == list(METHODS) == choices(merge, "methods")
    assert MergeConfig.model_fields["method"].annotation.__args__ == tuple(METHODS)
    assert set(MergeSearchConfig(methods=list(METHODS)).methods) == set(METHODS)
    assert choices(registry_list, "kind") == list(KINDS)
    assert choices(export, "qtype") == list(WRITER_TYPES)
    assert set(QuantizeConfig.model_fields["method"].annotation.__args__) == set(QUANT_METHODS)
    for name in BUNDLED_NAMES:
        assert DatasetConfig(name=name, bundled=name).bundled == name
        assert f"bundled:{name}" in run_cli("prep", "--help").stdout
    with pytest.raises(ValueError, match="bundled"):
        DatasetConfig(name="x", bundled="no-such-task")
    assert ExportConfig(gguf=WRITER_TYPES[-1]).gguf == WRITER_TYPES[-1]


def test_options_left_out_take_the_models_rules(tmp_path):
    """Only what the user typed reaches the model: ``--epochs`` alone is not "epochs and the default steps";
    ``none`` sets an optional option to None; a bad value names its flag, exit 2, nothing written."""
    from lorakit.cli.options import stage_options, take_stage_options
    from lorakit.train.options import DEFAULT_MAX_STEPS, TrainOptions

    seen = {}

    @click.command()
    @stage_options(TrainOptions)
    def probe(**options):
        seen["opts"] = take_stage_options(TrainOptions, options)

    runner = click.testing.CliRunner()
    assert runner.invoke(probe, ["--epochs", "2"]).exit_code == 0
    assert seen["opts"].epochs == 2 and seen["opts"].max_steps is None
    assert runner.invoke(probe, ["--min-loss-drop", "none", "--no-rslora"]).exit_code == 0
    assert seen["opts"].min_loss_drop is None and "rslora" in seen["opts"].model_fields_set
    assert runner.invoke(probe, []).exit_code == 0 and seen["opts"] == TrainOptions()
    assert TrainOptions().max_steps is None and DEFAULT_MAX_STEPS == 80
    bad = runner.invoke(probe, ["--epochs", "1", "--max-steps", "3"])
    assert isinstance(bad.exception, InputError) and "epochs or max_steps" in str(bad.exception)
    bad = runner.invoke(probe, ["--batch-size", "0", "--dropout", "1.5"])
    assert isinstance(bad.exception, InputError)
    assert "--batch-size" in str(bad.exception) and "--dropout" in str(bad.exception)

    proc = run_cli("quantize", "default", "-o", str(tmp_path / "q"), "--group-size", "sixty-four")
    assert proc.returncode == 2 and "--group-size" in proc.stderr
    proc = run_cli("quantize", "default", "-o", str(tmp_path / "q"), "--calib-general-fraction", "1.5")
    assert proc.returncode == 2 and "--calib-general-fraction" in proc.stderr
    assert_nothing_written(tmp_path / "q")


def test_train_without_steps_or_epochs_records_the_declared_default():
    from lorakit.train.loop import TrainConfig
    from lorakit.train.options import TRAIN

    assert TrainConfig().batch_size == TRAIN.batch_size and TrainConfig().lr == TRAIN.lr


def test_quantize_with_no_options_is_the_release_quantization(tmp_path, tiny_base):
    """`lorakit quantize MODEL -o OUT --calib DATA` writes what the release flow's quantize stage writes with the
    run config's defaults: GPTQ 4-bit g16 with a zero point, act-order, GPTAQ and clipping search, 256-token blocks, half general text."""
    from flows.config import QuantizeConfig
    from lorakit.quantize import read_quant_meta
    from tests.test_quantize import make_prep

    prep = make_prep(tmp_path / "prep", n_train=200)
    out = tmp_path / "q"
    proc = run_cli("quantize", str(tiny_base), "-o", str(out), "--calib", str(prep), "--quiet")
    assert proc.returncode == 0, proc.stderr
    meta = read_quant_meta(out)
    used = meta.used_settings()
    release = QuantizeConfig()
    assert used["method"] == release.method == "gptq" and used["bits"] == release.bits
    assert used["group_size"] == release.group_size and used["seq_len"] == release.seq_len
    assert used["sym"] is False and used["desc_act"] is True  # the measured default: a zero point, act-order
    assert used["gptaq_alpha"] == 0.5  # GPTAQ's input-error correction (gptaq_alpha none = 0.5 for gptq)
    assert used["clip_search"] is True
    from lorakit.quantize.calibration import DEFAULT_N_SAMPLES

    assert used["n_samples"] == DEFAULT_N_SAMPLES == 128  # what n_samples none means when the data gives enough
    general = meta.calibration["general"]
    assert general["source"] and general["fraction"] == pytest.approx(release.calib_general_fraction)
    recorded = json.loads((out / "lorakit_quant.json").read_text())
    assert recorded["params"]["method"] == "gptq"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]  # what transformers/vLLM read
    assert qcfg["desc_act"] is True and qcfg["sym"] is False and qcfg["group_size"] == release.group_size
