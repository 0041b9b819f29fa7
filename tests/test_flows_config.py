"""The run config (YAML <-> pydantic <-> release flow parameters) and the stage plan derived from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from flows.config import DatasetConfig, QuantizeConfig, ReleaseConfig, dump_config, load_config, parse_config
from flows.plan import ReleasePlan
from lorakit.errors import InputError
from tests.conftest import REPO, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_default_yaml_is_the_default_config():
    assert load_config(REPO / "configs" / "default.yaml") == ReleaseConfig()


def test_default_yaml_lists_every_key():
    """configs/default.yaml is the reference of every key (docs/pipeline.md says so): a field added to the config
    without its line there, or a line for a field that is gone, fails here, not in a user's run."""
    def keys(value, prefix=""):
        if isinstance(value, dict):
            return {k for name, v in value.items() for k in {prefix + name} | keys(v, prefix + name + ".")}
        if isinstance(value, list):
            return {k for i, v in enumerate(value) for k in keys(v, f"{prefix}{i}.")}
        return set()

    written = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert keys(written) == keys(ReleaseConfig().model_dump(mode="json"))


def test_tiny_yaml_loads():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.merge_weights() == [0.5, 0.5] and cfg.lora.max_steps == 3 and cfg.merge_search() is None


def _differences(a: ReleaseConfig, b: ReleaseConfig) -> dict[str, tuple]:
    """Dotted key -> (a's value, b's value) for every key the two configs resolve differently."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for name, sub in value.items() for k, v in flat(sub, f"{prefix}{name}.").items()}
        if isinstance(value, list):
            return {k: v for i, sub in enumerate(value) for k, v in flat(sub, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): value}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def test_quick_yaml_is_the_default_but_for_training_merge_weights_and_tuning():
    """configs/quick.yaml (the default before 240 steps, the merge search and scale tuning) differs from the
    default release only in what its comments say: each bundled adapter's steps and micro-batch, fixed merge
    weights of 1.3, and no scale tuning."""
    cfg, default = load_config(REPO / "configs" / "quick.yaml"), ReleaseConfig()
    assert _differences(cfg, default) == {
        "datasets.0.lora.max_steps": (120, 360), "datasets.0.lora.batch_size": (None, 1),
        "datasets.1.lora.max_steps": (120, 240), "datasets.1.lora.batch_size": (None, 1),
        "datasets.0.merge_weight": (1.3, None), "datasets.1.merge_weight": (1.3, None),
        "quantize.tune_steps": (0, 100)}
    assert cfg.merge_search() is None and cfg.merge_weights() == [1.3, 1.3]


def test_steps240_yaml_is_the_default_but_for_steps_fixed_merge_weights_and_no_tuning():
    """configs/steps240.yaml (an experiment docs/release-status.md measures) trains as the default does but for
    reverse-words' 240 steps (the default's 360 came after it), and merges with the fixed weights 1.3 the 120-step
    adapters were measured with, without scale tuning."""
    cfg, default = load_config(REPO / "configs" / "steps240.yaml"), ReleaseConfig()
    assert _differences(cfg, default) == {"datasets.0.lora.max_steps": (240, 360),
                                          "datasets.0.merge_weight": (1.3, None), "datasets.1.merge_weight": (1.3, None),
                                          "quantize.tune_steps": (0, 100)}
    assert cfg.merge_search() is None


def test_steps240_search_yaml_is_the_240_step_default_without_scale_tuning():
    """configs/steps240_search.yaml is the default release as it was before reverse-words trained 360 steps, without
    scale tuning: the same splits and merge (the same stage folders for the same adapters), so beside reverse-words'
    steps only the quantized model differs; its merge searches RegMean's weights on every val question the gate
    judges."""
    from flows.plan import ReleasePlan

    cfg, default = load_config(REPO / "configs" / "steps240_search.yaml"), ReleaseConfig()
    assert _differences(cfg, default) == {"datasets.0.lora.max_steps": (240, 360), "quantize.tune_steps": (0, 100)}
    search = cfg.merge_search()
    assert search.methods == ["regmean"] and search.max_examples is None and cfg.scorecard.judge_examples is None
    assert search == default.merge_search() and cfg.merges_with_regmean()
    plain, tuned = ReleasePlan(cfg), ReleasePlan(default)
    assert [plain.prep(ds)["output"] for ds in cfg.datasets] == [tuned.prep(ds)["output"] for ds in default.datasets]
    preps = {ds.name: f"/prep/{ds.name}" for ds in cfg.datasets}
    assert plain.merge(["a", "b"], preps)["output"] == tuned.merge(["a", "b"], preps)["output"]


def test_merge_search_is_on_by_default_where_it_has_weights_to_choose():
    """`merge.search: auto` (the default) searches with the default options for 2+ plain LoRA adapters and no
    weights given, with any method (regmean, the release's default, searches the weights of its projected
    updates); given weights, one dataset, DoRA or LoftQ adapters merge with fixed weights; null is off; a mapping
    is explicit, and with weights too it is an error. The search weighs the merge's method unless told, and scores
    the val questions the gate judges unless told."""
    from flows.config import MergeSearchConfig

    two = [{"name": n, "files": ["a.jsonl"]} for n in ("a", "b")]
    linear = {"method": "linear"}
    default = ReleaseConfig()
    assert default.merge.method == "regmean" and default.merge.search == "auto"
    assert default.merge_search() == MergeSearchConfig(methods=["regmean"], max_examples=None)
    assert parse_config({"datasets": two, "merge": linear}).merge_search() == MergeSearchConfig(max_examples=None)
    judged = {"datasets": two, "merge": linear, "scorecard": {"judge_examples": 30}}
    assert parse_config(judged).merge_search().max_examples == 30
    told = {"datasets": two, "merge": {**linear, "search": {"max_examples": 10}}, "scorecard": {"judge_examples": 30}}
    assert parse_config(told).merge_search().max_examples == 10
    assert MergeSearchConfig().objective == "auto"
    assert parse_config({"datasets": two, "merge": {**linear, "weights": [1, 2]}}).merge_search() is None
    assert parse_config({"datasets": two[:1], "merge": linear}).merge_search() is None
    assert parse_config({"datasets": two, "merge": linear, "lora": {"variant": "dora"}}).merge_search() is None
    loftq = {"datasets": two, "lora": {"init": "loftq"}, "merge": {**linear, "loftq_base": "dequantized"}}
    assert parse_config(loftq).merge_search() is None
    assert parse_config({"datasets": two, "merge": {**linear, "search": None}}).merge_search() is None
    searched = {"datasets": two, "merge": {**linear, "search": {"max_trials": 3}}}
    assert parse_config(searched).merge_search().max_trials == 3
    assert parse_config({"datasets": two}).merge_search().methods == ["regmean"]
    assert parse_config({"datasets": two, "merge": {"search": {"max_trials": 3}}}).merge_search().methods == ["regmean"]
    assert parse_config({"datasets": two, "merge": {"method": "ties"}}).merge_search().methods == ["ties"]
    given = {"datasets": two, "merge": {"search": {"methods": ["linear", "regmean"]}}}
    assert parse_config(given).merge_search().methods == ["linear", "regmean"]
    with pytest.raises(InputError, match="'weights' or 'search'"):
        parse_config({"datasets": two, "merge": {**linear, "weights": [1, 1], "search": {"max_trials": 3}}})
    with pytest.raises(InputError, match="merge.search"):
        parse_config({"datasets": two, "merge": {"search": "always"}})
    # a dataset's own merge_weight is a weight given: nothing left to search
    weighted = [two[0], {**two[1], "merge_weight": 0.5}]
    assert parse_config({"datasets": weighted, "merge": linear}).merge_search() is None
    assert parse_config({"datasets": weighted}).merge_search() is None
    unset = [two[0], {**two[1], "merge_weight": None}]  # null is not a weight: the search still chooses
    assert parse_config({"datasets": unset}).merge_search() is not None


def test_merge_weights_come_from_the_datasets_unless_the_merge_names_them(tmp_path):
    """``datasets[i].merge_weight`` (1.0 unless set) is each adapter's weight when ``merge.weights`` is null; a
    ``merge.weights`` list overrides them all; the merge stage and its registered params take them, the YAML
    round-trips, and a non-finite weight is one line naming the key. The default release weighs both bundled tasks
    1.3 with the RegMean anchor at 1.0 (lorakit merge's own anchor default is off)."""
    two = [{"name": n, "files": ["a.jsonl"]} for n in ("a", "b")]
    assert parse_config({"datasets": two}).merge_weights() == [1.0, 1.0]
    cfg = parse_config({"datasets": [two[0], {**two[1], "merge_weight": 1.5}], "output_dir": str(tmp_path / "o")})
    assert cfg.merge_weights() == [1.0, 1.5]
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg
    over = parse_config({"datasets": [two[0], {**two[1], "merge_weight": 1.5}], "merge": {"weights": [2, 3]}})
    assert over.merge_weights() == [2.0, 3.0]
    plan = ReleasePlan(cfg)
    assert plan.prep(cfg.datasets[1]) == ReleasePlan(parse_config({"datasets": two, "output_dir": str(tmp_path / "o")})
                                                     ).prep(cfg.datasets[0].model_copy(update={"name": "b"}))
    assert "merge_weight" not in plan.prep(cfg.datasets[1])["params"]  # prepare_dataset takes prep's keys only
    merge = plan.merge(["x", "y"], {"a": "pa", "b": "pb"})
    assert merge["weights"] == [1.0, 1.5] and merge["params"]["regmean_anchor"] == 1.0
    default = ReleaseConfig()
    assert default.merge_weights() == [1.0, 1.0] and default.merge.regmean_anchor == 1.0
    assert [ds.merge_weight for ds in default.datasets] == [None, None]  # the merge search chooses them
    from lorakit.merge.options import MERGE

    assert MERGE.regmean_anchor is None  # `lorakit merge` anchors only when asked
    with pytest.raises(InputError, match="datasets.1.merge_weight"):
        parse_config({"datasets": [two[0], {**two[1], "merge_weight": float("nan")}]})


def test_release_flow_parameters_are_the_config_fields():
    from flows.release import release

    params = inspect.signature(release.fn).parameters
    assert list(params) == list(ReleaseConfig.model_fields)
    defaults = ReleaseConfig()
    for name, param in params.items():
        assert param.default == getattr(defaults, name), name
    # Prefect derives the deployment's parameter schema from the same types.
    assert set(release.parameters.properties) == set(ReleaseConfig.model_fields)


@pytest.mark.parametrize("text, expected", [
    ("lora: {rank: 8}\n", "unknown key 'lora.rank'"),
    ("bsae: x\n", "unknown key 'bsae'"),
    ("datasets: [{name: a, bundled: a, fromat: chat}]\n", "unknown key 'datasets.0.fromat'"),
    ("datasets: [{bundled: a}]\n", "missing key 'datasets.0.name'"),
    ("datasets: [{name: a, bundled: reverse-words, files: [x.jsonl]}]\n", "exactly one of 'bundled'"),
    ("datasets: [{name: a, bundled: a}]\n", "'datasets.0.bundled': Input should be 'reverse-words' or 'number-words'"),
    ("datasets: [{name: a}]\n", "exactly one of 'bundled'"),
    ("datasets: [{name: a, bundled: reverse-words}, {name: a, bundled: number-words}]\n", "repeated: a"),
    ("merge: {weights: [1, 2, 3]}\n", "merge.weights has 3 value(s) for 2 dataset(s)"),
    ("quantize: {method: int8}\n", "'quantize.method'"),
    ("gate: {max_degradation: -0.1}\n", "'gate.max_degradation'"),
    ("datasets: [{name: ../x, bundled: a}]\n", "'datasets.0.name'"),
    ("quantize: {calib_dataset: nope}\n", "calib_dataset 'nope' is not one of the datasets"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("datasets: [{name: a, bundled: reverse-words, lora: {r: 8}}]\n", "r cannot differ between adapters"),
    ("datasets: [{name: a, bundled: reverse-words, lora: {lr: -1}}]\n", "datasets.0.lora (a): 'lr'"),
])
def test_bad_config_is_one_actionable_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "base: default\nlora: {r: 4\n")
    with pytest.raises(InputError, match=r"run.yaml:\d+:\d+ is not valid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_is_the_default(tmp_path):
    assert load_config(write(tmp_path, "")) == ReleaseConfig()


def test_dump_round_trips():
    cfg = parse_config({"base": "m", "datasets": [{"name": "t", "files": ["a.jsonl"]}], "merge": {"weights": [1]}})
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_plan_folders_are_content_addressed(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "x"}\n')
    base = {"base": "m", "datasets": [{"name": "t", "files": [str(data)]}], "output_dir": str(tmp_path / "out")}
    one, two = ReleasePlan(parse_config(base)), ReleasePlan(parse_config({**base, "lora": {"r": 4}}))
    ds = one.config.datasets[0]
    assert one.prep(ds) == two.prep(ds)  # training params do not touch prepared data
    prep_dir = one.prep(ds)["output"]
    assert Path(prep_dir).parent == tmp_path / "out" / "prep" and Path(prep_dir).name.startswith("t-")
    assert one.train(ds, prep_dir)["output"] != two.train(ds, prep_dir)["output"]
    a1, a2 = one.train(ds, prep_dir)["output"], two.train(ds, prep_dir)["output"]
    preps = {"t": prep_dir}
    assert one.merge([a1], preps)["output"] != one.merge([a2], preps)["output"]  # downstream folders follow inputs
    assert one.merge([a1], preps)["output"] == two.merge([a1], preps)["output"]
    assert one.prep(ds)["sources"] == [str(data)]


def test_a_dataset_trains_with_its_own_options_over_the_runs(tmp_path):
    """``datasets[i].lora`` changes that task's adapter only: its training params (and so its folder) and its
    registered params; the other task, its prepared data and the run's lora: section stay as they were."""
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "x"}\n')
    two = [{"name": n, "files": [str(data)]} for n in ("a", "b")]
    plain = parse_config({"datasets": two, "lora": {"lr": 1e-3}, "output_dir": str(tmp_path / "out")})
    tuned = parse_config({"datasets": [two[0], {**two[1], "lora": {"lr": 2e-3, "max_steps": 7}}], "lora": {"lr": 1e-3},
                          "output_dir": str(tmp_path / "out")})
    a_plain, b_plain = plain.datasets
    a_tuned, b_tuned = tuned.datasets
    assert tuned.lora_for(b_tuned).lr == 2e-3 and tuned.lora_for(b_tuned).max_steps == 7
    assert tuned.lora_for(a_tuned) == tuned.lora == plain.lora and tuned.lora.lr == 1e-3
    one, other = ReleasePlan(plain), ReleasePlan(tuned)
    assert one.prep(b_plain) == other.prep(b_tuned)  # training options do not touch prepared data
    prep_dir = one.prep(b_plain)["output"]
    assert other.train(b_tuned, prep_dir)["params"]["lr"] == 2e-3
    assert other.train(b_tuned, prep_dir)["output"] != one.train(b_plain, prep_dir)["output"]
    assert other.train(a_tuned, prep_dir) == one.train(a_plain, prep_dir)
    assert parse_config(yaml.safe_load(dump_config(tuned))) == tuned


def test_cli_run_bad_config_exit_2(tmp_path):
    path = write(tmp_path, "lora: {rank: 8}\n")
    proc = run_cli("run", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: unknown key 'lora.rank'. "
                                                "Fix the file (keys and defaults: docs/pipeline.md, 'The run config')."]


def test_cli_show_config(tmp_path):
    proc = run_cli("run", str(REPO / "configs" / "tiny.yaml"), "--show-config", "-o", str(tmp_path), check=True)
    cfg = parse_config(yaml.safe_load(proc.stdout))
    assert cfg.output_dir == str(tmp_path) and cfg.registry.name == "tiny-release"


def test_calibration_covers_every_dataset(tmp_path):
    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text('{"text": "x"}\n')
    two = ReleasePlan(parse_config({"datasets": [{"name": "a", "files": [str(files[0])]},
                                                 {"name": "b", "files": [str(files[1])]}]}))
    assert two.calibration()["sources"] == [str(f) for f in files]
    assert Path(two.calibration()["output"]).name.startswith("calibration-")
    chosen = ReleasePlan(two.config.model_copy(update={"quantize": two.config.quantize.model_copy(
        update={"calib_dataset": "b"})}))
    assert chosen.calibration() is None and chosen.config.calib_dataset() == "b"
    one = ReleasePlan(parse_config({"datasets": [{"name": "a", "files": [str(files[0])]}]}))
    assert one.calibration() is None and one.config.calib_dataset() == "a"


def test_release_gate_checks_general_text_by_default_and_the_search_must_meet_it(tmp_path):
    from lorakit.data.general import general_text_path
    from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS, GENERAL_CHECK_NAME

    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "x"}\n')
    base = {"base": "m", "datasets": [{"name": "t", "files": [str(data)]}, {"name": "u", "files": [str(data)]}]}
    plan = ReleasePlan(parse_config(base))
    gate = plan.gate("b", "c", {"t": "pt", "u": "pu"})
    extra = gate["extra_checks"]
    assert gate["params"]["primary_name"] == "t"  # the verdict names the first task's check after it
    assert [c["name"] for c in extra] == ["u", GENERAL_CHECK_NAME]
    assert extra[1] == {"name": GENERAL_CHECK_NAME, "data": str(general_text_path()), "max_degradation": 0.05,
                        "kind": "general", "split": "val", "max_tokens": DEFAULT_GENERAL_MAX_TOKENS}
    assert "eval_general" not in plan.quantize("m", "cal")["params"]  # a fixed quantization scores nothing
    off = ReleasePlan(parse_config({**base, "gate": {"general_text": None}}))
    assert [c["name"] for c in off.gate("b", "c", {"t": "pt", "u": "pu"})["extra_checks"]] == ["u"]
    searched = ReleasePlan(parse_config({**base, "quantize": {"target_degradation": 0.05}}))
    params = searched.quantize("m", "cal")["params"]
    assert params["eval_general"] == "default" and params["eval_general_max_tokens"] == DEFAULT_GENERAL_MAX_TOKENS
    assert params["calib_general"] == "default" and params["calib_general_fraction"] == QuantizeConfig().calib_general_fraction == 0.5


def _check(name, degradation, passed, kl=0.01, max_kl=None):
    return {"name": name, "degradation": degradation, "max_degradation": 0.05, "passed": passed,
            "baseline_ppl": 10.0, "candidate_ppl": 10.0 * (1 + degradation), "distribution": {"kl_mean": kl},
            "max_kl": max_kl}


@pytest.mark.parametrize("checks, expected", [
    ([_check("reverse-words", 0.01, True), _check("general text", 0.12, False)],
     "gate rejected: degradation +12.00% > 5.00% on general text (perplexity 10 -> 11.2); 1/2 checks passed"),
    ([_check("reverse-words", 0.01, True), _check("general text", 0.03, False, kl=0.09, max_kl=0.05)],
     "gate rejected: mean KL 0.0900 > 0.0500 on general text (perplexity +3.00%, within 5.00%); 1/2 checks passed"),
    ([_check("reverse-words", 0.01, True), _check("general text", 0.03, True)],
     "gate passed: degradation +3.00% <= 5.00% on general text (perplexity 10 -> 10.3); 2/2 checks passed"),
])
def test_verdict_line_names_the_deciding_check_and_why(checks, expected):
    from flows.report import verdict_line

    meta = {"passed": all(c["passed"] for c in checks), "checks": checks}
    assert verdict_line(meta, 0.05) == expected


def test_tuning_on_every_position_keeps_the_quantize_folders_made_before_the_option(tmp_path):
    """``quantize.tune_tokens`` all is what tuning did before the option existed: its quantize arguments (and so the
    stage folder and Prefect's cache key) leave it out; answers is another folder."""
    cfg = parse_config({"output_dir": str(tmp_path / "out")})
    plan = ReleasePlan(cfg).quantize("merged", "calib")
    assert cfg.quantize.tune_tokens == "all" and "tune_tokens" not in plan["params"]
    answers = ReleasePlan(parse_config({"output_dir": str(tmp_path / "out"), "quantize": {"tune_tokens": "answers"}}))
    other = answers.quantize("merged", "calib")
    assert other["params"]["tune_tokens"] == "answers" and other["output"] != plan["output"]
    assert cfg.quantize.tune_answer_weight == 1.0 and "tune_answer_weight" not in plan["params"]
    assert cfg.quantize.tune_samples is None and "tune_samples" not in plan["params"]
    weighed = ReleasePlan(parse_config({"output_dir": str(tmp_path / "out"), "quantize": {"tune_answer_weight": 4}}))
    third = weighed.quantize("merged", "calib")
    assert third["params"]["tune_answer_weight"] == 4 and third["output"] not in (plan["output"], other["output"])


def test_keep_sensitive_at_zero_keeps_the_quantize_folders_made_before_the_option(tmp_path):
    """``quantize.keep_sensitive`` 0 is what quantization did before the option existed: the stage's arguments leave
    it out (same folder, same cache key); any other value is its own folder and reaches the quantize stage."""
    off = ReleasePlan(parse_config({"output_dir": str(tmp_path / "out"), "quantize": {"keep_sensitive": 0}}))
    on = ReleasePlan(parse_config({"output_dir": str(tmp_path / "out"), "quantize": {"keep_sensitive": 3}}))
    a, b = off.quantize("merged", "calib"), on.quantize("merged", "calib")
    assert "keep_sensitive" not in a["params"] and b["params"]["keep_sensitive"] == 3
    assert a["output"] != b["output"]
