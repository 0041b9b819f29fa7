"""The release scorecard and the gate's scorecard checks, on a tiny model that really learns two tasks.

Two trivial instruction tasks ("Answer yes." -> "yes", "Answer no." -> "no") are learned by LoRA adapters trained
with lorakit's own trainer on a tiny random Llama (100% exact match after 30 steps; the random base answers
garbage, 0%). References come from the models' own greedy answers and from first principles (a weight-0 merge
keeps nothing of that adapter), never from the scorecard code.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from lorakit.data.prep import prepare_dataset
from lorakit.errors import InputError
from lorakit.scorecard import ScorecardTask, build_scorecard, judge_scorecard, read_scorecard
from tests.conftest import assert_nothing_written, run_cli, train_answer_tasks, write_answer_data

SEQ = dict(seq_len=64, progress=False)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """base, {task: (prep, adapter)}, the merge that drops "no" (weights 1, 0), and "yes" alone merged."""
    from lorakit.merge import merge_adapters
    from lorakit.models.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("scorecard")
    base = make_tiny_llama(root / "base", seed=0)
    tasks = train_answer_tasks(root, base, {"yes": "Answer yes.", "no": "Answer no."})
    adapters = [tasks["yes"][1], tasks["no"][1]]
    drop_no = merge_adapters(adapters, [1.0, 0.0], root / "merged-drop-no", output_kind="model", base=base,
                             progress=False).output
    yes_only = merge_adapters([tasks["yes"][1]], [1.0], root / "merged-yes", output_kind="model", base=base,
                              progress=False).output
    return {"root": root, "base": base, "tasks": tasks, "drop_no": drop_no, "yes_only": yes_only}


def _tasks(release, names=("yes", "no")) -> list[ScorecardTask]:
    return [ScorecardTask(n, *release["tasks"][n]) for n in names]


@pytest.fixture(scope="module")
def drop_card(release):
    """The scorecard of the merge that dropped "no", with the merged model standing in as its own quantization."""
    out = release["root"] / "card-drop"
    build_scorecard(release["base"], _tasks(release), release["drop_no"], release["drop_no"], output=out, **SEQ)
    return out


def test_merge_that_drops_a_task_is_rejected_by_retention_naming_the_task(release, drop_card):
    card = read_scorecard(drop_card)
    val = {t: card["tasks"][t]["splits"]["val"] for t in ("yes", "no")}
    # the tasks were learned (the premise of a retention test) and the base cannot do them
    for t in ("yes", "no"):
        assert val[t]["models"]["base"]["exact_match"] == 0.0 and val[t]["models"]["adapter"]["exact_match"] == 1.0
    assert val["yes"]["models"]["merged"]["exact_match"] == 1.0 and val["no"]["models"]["merged"]["exact_match"] == 0.0
    assert val["no"]["retention"]["exact_match"]["value"] == 0.0 and val["yes"]["retention"]["exact_match"]["value"] == 1.0
    # test is scored and reported too, but only val is judged
    assert set(card["tasks"]["no"]["splits"]) == {"val", "test"} and card["tasks"]["no"]["report_note"] is None
    checks = judge_scorecard(card)
    failed = [(c.check, c.task) for c in checks if not c.passed]
    assert failed == [("min_retention", "no")]

    # the gate, end to end through the CLI: exit 3, one line naming the check and the task
    out = release["root"] / "gate-drop"
    proc = run_cli("gate", "--baseline", str(release["drop_no"]), "--candidate", str(release["drop_no"]), "--data",
                   str(release["tasks"]["yes"][0]), "--seq-len", "64", "--scorecard", str(drop_card), "-o", str(out))
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-2]  # then "verdict written to ..."
    assert last.startswith("REJECTED: min_retention failed on no:"), proc.stdout
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] is False and gate["failed_checks"] == ["min_retention:no"]
    assert all(c["passed"] for c in gate["checks"])  # perplexity alone (merged == candidate) would have passed
    md = (out / "gate.md").read_text()
    assert "## Scorecard" in md and "| no | val |" in md and "min_retention failed on no" in md
    assert (out / "scorecard.json").is_file() and (out / "scorecard.png").stat().st_size > 1000
    # with retention off, the same release passes: the rejection came from that check alone
    ok = run_cli("gate", "--baseline", str(release["drop_no"]), "--candidate", str(release["drop_no"]), "--data",
                 str(release["tasks"]["yes"][0]), "--seq-len", "64", "--scorecard", str(drop_card),
                 "--min-retention", "0", "-q")
    assert ok.returncode == 0 and ok.stdout.strip() == "PASSED", ok.stdout + ok.stderr[-2000:]


def test_accuracy_drop_and_an_adapter_that_did_not_learn(release, tmp_path):
    # "quantized" = the untouched base: every answer the merge learned is lost
    yes_prep, yes_adapter = release["tasks"]["yes"]
    no_prep, _ = release["tasks"]["no"]
    wrong = [ScorecardTask("yes", yes_prep, yes_adapter), ScorecardTask("no", no_prep, yes_adapter)]
    card = build_scorecard(release["base"], wrong, release["yes_only"], release["base"], **SEQ).data
    checks = {(c.check, c.task): c for c in judge_scorecard(card)}
    assert not checks[("max_accuracy_drop", "yes")].passed and checks[("max_accuracy_drop", "yes")].value == 1.0
    assert checks[("max_accuracy_drop", "no")].passed  # 0% merged, 0% quantized
    learned = checks[("min_retention", "no")]
    assert not learned.passed and learned.value is None
    assert learned.message.startswith("the adapter for no did not learn it")
    assert checks[("min_retention", "yes")].passed
    assert [c.check for c in judge_scorecard(card, min_retention=None, max_accuracy_drop=None)] == []


def test_adapter_via_peft_predicts_exactly_what_the_merged_single_adapter_predicts(release):
    card = build_scorecard(release["base"], _tasks(release, ["yes"]), release["yes_only"], output=None, **SEQ)
    for split in ("val", "test"):
        preds = card.predictions["yes"][split]
        adapter = [p["prediction"] for p in preds["adapter"]]
        assert adapter == [p["prediction"] for p in preds["merged"]]
        assert adapter != [p["prediction"] for p in preds["base"]]  # not vacuous: the adapter changed the answers
        models = card.data["tasks"]["yes"]["splits"][split]["models"]
        assert models["adapter"]["path_used"] == "dense+adapter" and models["merged"]["path_used"] == "dense"
        assert models["merged"]["mean_nll"] == pytest.approx(models["adapter"]["mean_nll"], rel=1e-4)
    assert card.data["models"]["quantized"] is None and "quantized" not in card.data["tasks"]["yes"]["splits"]["val"]["models"]


# --- bad input ---------------------------------------------------------------------------------------------------

def test_text_prep_is_a_labelled_skip_judged_on_nll(release, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"yes no yes item {i} and more words"}) + "\n" for i in range(60)))
    prep = prepare_dataset([src], tmp_path / "p", base=release["base"], progress=False).output
    card = build_scorecard(release["base"], [ScorecardTask("plain", prep, release["tasks"]["yes"][1])],
                           release["yes_only"], output=tmp_path / "card", **SEQ)
    val = card.data["tasks"]["plain"]["splits"]["val"]
    assert "no reference answers" in val["accuracy_skipped"] and val["models"]["merged"]["exact_match"] is None
    assert val["retention"]["exact_match"] is None and val["retention"]["nll"] is not None
    assert [c.metric for c in judge_scorecard(card.data)] == ["nll"]
    from lorakit.scorecard.report import render_text

    assert "skip" in render_text(card.data) and "no reference answers" in render_text(card.data)


def test_prep_without_test_split_reports_val_and_says_so(release, tmp_path):
    src = write_answer_data(tmp_path / "y.jsonl", "Answer yes.", "yes")
    prep = prepare_dataset([src], tmp_path / "p", base=release["base"], max_length=64, test_fraction=0,
                           progress=False).output
    card = build_scorecard(release["base"], [ScorecardTask("yes", prep, release["tasks"]["yes"][1])],
                           release["yes_only"], **SEQ).data
    entry = card["tasks"]["yes"]
    assert list(entry["splits"]) == ["val"] and entry["report_split"] == "val"
    assert "no test split" in entry["report_note"] and "no test split" in entry["splits"]["val"]["note"]


def test_model_with_another_tokenizer_is_refused_before_any_work(release, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(release["yes_only"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    out = tmp_path / "card"
    with pytest.raises(InputError, match="different tokenizer than the base"):
        build_scorecard(release["base"], _tasks(release), release["yes_only"], other, output=out, **SEQ)
    assert_nothing_written(out)
    proc = run_cli("scorecard", "--base", str(release["base"]), "--task", "yes", *map(str, release["tasks"]["yes"]),
                   "--merged", str(other), "-o", str(out), "--seq-len", "64")
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr
    assert_nothing_written(out)


def test_gate_refuses_a_scorecard_of_other_models_and_thresholds_without_one(release, drop_card, tmp_path):
    out = tmp_path / "gate"
    proc = run_cli("gate", "--baseline", str(release["yes_only"]), "--candidate", str(release["yes_only"]), "--data",
                   str(release["tasks"]["yes"][0]), "--seq-len", "64", "--scorecard", str(drop_card), "-o", str(out))
    assert proc.returncode == 2 and "the scorecard was built for merged model" in proc.stderr
    proc = run_cli("gate", "--baseline", str(release["yes_only"]), "--candidate", str(release["yes_only"]), "--data",
                   str(release["tasks"]["yes"][0]), "--min-retention", "0.9", "-o", str(out))
    assert proc.returncode == 2 and "pass --scorecard" in proc.stderr
    assert_nothing_written(out)


def test_cli_writes_the_folder_and_registry_show_prints_the_scorecard(release, drop_card, tmp_path):
    from registry import Registry

    out = tmp_path / "card"
    proc = run_cli("scorecard", "--base", str(release["base"]), "--task", "yes", *map(str, release["tasks"]["yes"]),
                   "--task", "no", *map(str, release["tasks"]["no"]), "--merged", str(release["drop_no"]),
                   "--quantized", str(release["drop_no"]), "-o", str(out), "--seq-len", "64", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["predictions.json", "scorecard.json", "scorecard.md",
                                                     "scorecard.png"]
    assert read_scorecard(out)["tasks"] == read_scorecard(drop_card)["tasks"]  # deterministic: same numbers
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["task", "split"] and lines[1].split()[:2] == ["yes", "val"]
    assert any(line.startswith("general text perplexity (") for line in lines)  # on by default in the CLI
    root = tmp_path / "registry"
    v = Registry(root).register(release["drop_no"], name="rel", kind="quantized",
                                metadata={"scorecard.json": read_scorecard(out)})
    shown = run_cli("registry", "--root", str(root), "show", v.ref)
    assert shown.returncode == 0, shown.stderr
    assert "scorecard (the gate judges val" in shown.stdout and "not learned" not in shown.stdout
    assert any(line.split()[:2] == ["no", "val"] and "0%" in line for line in shown.stdout.splitlines())


def test_general_text_scores_every_model_on_one_stream(release, tmp_path):
    """Every model's general-text perplexity equals `lorakit.evaluate.perplexity` of that model on the same capped
    text; the changes are ratios of those; a quantized model identical to the merged one changes nothing."""
    from lorakit.data.general import general_text_path
    from lorakit.evaluate import perplexity
    from lorakit.evaluate.text import read_eval_texts, tokenize_eval_texts
    from lorakit.evaluate.loading import describe_model, load_tokenizer

    card = build_scorecard(release["base"], _tasks(release), release["drop_no"], release["drop_no"],
                           general="default", general_max_tokens=640, max_examples=4, **SEQ).data
    g = card["general_text"]
    assert set(g["models"]) == {"base", "adapter:yes", "adapter:no", "merged", "quantized"}
    tokens = tokenize_eval_texts(read_eval_texts(general_text_path()), load_tokenizer(describe_model(release["base"])),
                                 max_tokens=640)
    for key, model in (("base", release["base"]), ("merged", release["drop_no"])):
        assert g["models"][key]["ppl"] == pytest.approx(perplexity(str(model), tokens, seq_len=64, progress=False).ppl,
                                                        rel=1e-9)
    assert g["vs_base"]["merged"] == pytest.approx(g["models"]["merged"]["ppl"] / g["models"]["base"]["ppl"] - 1)
    assert g["quantized_vs_merged"] == 0.0 and g["models"]["base"]["tokens"] <= 640
    # merged and quantized were scored in one pass: identical models, so no KL and full top-1 agreement
    assert g["pair"]["distribution"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert g["pair"]["distribution"]["top1_agreement"] == 1.0
    assert g["pair"]["merged"]["ppl"] == g["models"]["merged"]["ppl"] == g["pair"]["quantized"]["ppl"]
    assert build_scorecard(release["base"], _tasks(release, ("yes",)), release["yes_only"], None, max_examples=2,
                           **SEQ).data["general_text"] is None  # not asked for: not scored


def test_gate_reuses_the_scorecards_general_text_pass_only_when_it_measured_the_same_thing(release, tmp_path):
    """The release scores merged vs quantized on general text once: the gate takes the scorecard's one-pass
    measurement when models, tokens, windows and dtype are the same (and its numbers are what the gate measures
    itself without a scorecard), and measures again when any of them differ."""
    from lorakit.gate import check
    from lorakit.gate.general import general_check

    merged, quantized = release["drop_no"], release["base"]  # two different models (the base stands in): KL > 0
    card = build_scorecard(release["base"], _tasks(release), merged, quantized, general="default",
                           general_max_tokens=640, max_examples=4, **SEQ).data
    pair = card["general_text"]["pair"]
    assert pair["distribution"]["kl_mean"] > 0

    def general(scorecard, max_tokens=640):
        v = check(merged, quantized, release["tasks"]["yes"][0], extra_checks=[general_check("default", 0.05, max_tokens)],
                  scorecard=scorecard, min_retention=None, max_accuracy_drop=None, **SEQ)
        return next(c for c in v.checks if c.kind == "general")

    reused, fresh, other = general(card), general(None), general(card, max_tokens=512)
    assert reused.measured_in == "scorecard" and fresh.measured_in is None and other.measured_in is None
    assert (reused.baseline_ppl, reused.candidate_ppl) == (pair["merged"]["ppl"], pair["quantized"]["ppl"])
    assert reused.distribution == pair["distribution"]
    assert reused.baseline_ppl == pytest.approx(fresh.baseline_ppl, rel=1e-9)
    assert reused.candidate_ppl == pytest.approx(fresh.candidate_ppl, rel=1e-9)
    assert reused.distribution["kl_mean"] == pytest.approx(fresh.distribution["kl_mean"], rel=1e-6)
    assert other.tokens < reused.tokens  # a shorter stream: measured by the gate itself
    # a scorecard of other weights under the same folder names is not reused: the digests differ
    stale = json.loads(json.dumps(card))
    stale["general_text"]["pair"]["models"]["quantized"]["digest"] = {"folder": "0" * 64}
    assert general(stale).measured_in is None


def test_general_forgetting_judges_merged_against_base_on_general_text(release, tmp_path):
    """max_general_forgetting: the merged model's general-text perplexity over the base's, from perplexities
    measured here independently; a threshold below that loss fails once, naming general text; above it passes;
    None and a scorecard without general text judge nothing; the CLI needs --scorecard for it."""
    from lorakit.data.general import general_text_path
    from lorakit.evaluate import perplexity
    from lorakit.evaluate.loading import describe_model, load_tokenizer
    from lorakit.evaluate.text import read_eval_texts, tokenize_eval_texts

    # the trained merge scores the tiny corpus better than the random base, so the roles are swapped to make a loss:
    # the merge stands as the base (its adapters apply on top) and the random model as the "merged" one
    base_model, merged_model = release["drop_no"], release["base"]
    card = build_scorecard(base_model, _tasks(release), merged_model, merged_model, general="default",
                           general_max_tokens=640, max_examples=4, **SEQ).data
    tokens = tokenize_eval_texts(read_eval_texts(general_text_path()), load_tokenizer(describe_model(base_model)),
                                 max_tokens=640)
    base, merged = (perplexity(str(m), tokens, seq_len=64, progress=False).ppl for m in (base_model, merged_model))
    loss = merged / base - 1
    assert loss > 1e-3, "the merged model must be worse than the base on general text for this test to bite"

    def forgetting(threshold, scorecard=card):
        return [c for c in judge_scorecard(scorecard, min_retention=None, max_accuracy_drop=None,
                                           max_general_forgetting=threshold)]

    [below] = forgetting(loss - 1e-6)
    assert (below.check, below.task, below.passed) == ("max_general_forgetting", "general text", False)
    assert below.value == pytest.approx(loss, rel=1e-9)
    assert [c.passed for c in forgetting(loss + 1e-6)] == [True]
    assert forgetting(None) == []
    assert forgetting(0.0, {**card, "general_text": None}) == []
    proc = run_cli("gate", "--baseline", str(release["drop_no"]), "--candidate", str(release["drop_no"]), "--data",
                   str(release["tasks"]["yes"][0]), "--seq-len", "64", "--max-general-forgetting", "0.1",
                   "-o", str(tmp_path / "g"))
    assert proc.returncode == 2 and "--max-general-forgetting judges a release scorecard" in proc.stderr
    assert_nothing_written(tmp_path / "g")


def test_max_examples_caps_perplexity_to_the_examples_exact_match_scores(release):
    """With max_examples N, a split's NLL is over its first N rendered examples, as `lorakit.evaluate.perplexity`
    computes it on those texts alone, not over the whole split."""
    from lorakit.data.splits import read_texts
    from lorakit.evaluate import perplexity
    from lorakit.evaluate.loading import describe_model, load_tokenizer
    from lorakit.evaluate.text import read_eval_texts, tokenize_eval_texts

    prep = release["tasks"]["yes"][0]
    texts = read_texts(prep, "val")
    assert len(texts) > 3, "the val split must be larger than the cap for this test to mean anything"
    card = build_scorecard(release["base"], _tasks(release, ("yes",)), release["yes_only"], None, max_examples=3,
                           **SEQ).data
    val = card["tasks"]["yes"]["splits"]["val"]["models"]["merged"]
    tok = load_tokenizer(describe_model(release["base"]))
    capped = perplexity(str(release["yes_only"]), tokenize_eval_texts(read_eval_texts(texts[:3]), tok), seq_len=64,
                        progress=False)
    whole = perplexity(str(release["yes_only"]), tokenize_eval_texts(read_eval_texts(texts), tok), seq_len=64,
                       progress=False)
    assert val["n_examples"] == 3 and val["tokens"] == capped.tokens < whole.tokens
    assert val["mean_nll"] == pytest.approx(capped.mean_nll, rel=1e-9)


def test_the_gate_judges_retention_and_the_accuracy_drop_on_every_val_question_and_the_table_keeps_its_first(
        release):
    """judge_examples (default: all) widens what the gate judges (every model answers every val question: retention
    and the quantized drop); the table's columns are the first max_examples answers of the same run. References:
    lorakit.evaluate.task_accuracy on each sample alone, retention from its definition."""
    from lorakit.evaluate import task_accuracy

    prep, adapter = release["tasks"]["yes"]
    card = build_scorecard(release["base"], _tasks(release, ("yes",)), release["yes_only"], release["base"],
                           max_examples=2, **SEQ)
    val = card.data["tasks"]["yes"]["splits"]["val"]
    whole = {r: task_accuracy(str(m), str(prep), split="val", progress=False)
             for r, m in (("merged", release["yes_only"]), ("quantized", release["base"]), ("base", release["base"]))}
    whole["adapter"] = task_accuracy(str(adapter), str(prep), split="val", base=str(release["base"]), progress=False)
    first = task_accuracy(str(release["base"]), str(prep), split="val", max_examples=2, progress=False)
    n = whole["merged"].n_examples
    assert n > 2 and val["n_examples"] == 2 and val["judged"]["n_examples"] == n
    assert val["judged"]["merged"] == whole["merged"].exact_match == 1.0
    assert val["judged"]["quantized"] == whole["quantized"].exact_match
    assert val["judged"]["accuracy_drop"] == whole["merged"].exact_match - whole["quantized"].exact_match
    base_em, adapter_em = whole["base"].exact_match, whole["adapter"].exact_match
    assert (val["judged"]["base"], val["judged"]["adapter"]) == (base_em, adapter_em) and adapter_em > base_em
    assert val["judged"]["retention"]["value"] == pytest.approx((1.0 - base_em) / (adapter_em - base_em))
    for role in ("base", "adapter"):
        assert card.predictions["yes"]["val"]["judged"][role] == [p.exact for p in whole[role].predictions]
    assert val["models"]["quantized"]["exact_match"] == first.exact_match
    assert len(card.predictions["yes"]["val"]["quantized"]) == 2
    assert card.predictions["yes"]["val"]["judged"]["quantized"] == [p.exact for p in whole["quantized"].predictions]
    assert "judged" not in card.data["tasks"]["yes"]["splits"]["test"]  # the gate judges val only
    from lorakit.scorecard.report import render_markdown, render_text

    for text in (render_markdown(card.data), render_text(card.data)):
        assert f"the gate's sample (val, {n} questions)" in text
    m, q = ([p.exact for p in whole[r].predictions] for r in ("merged", "quantized"))
    lost, gained = sum(a and not b for a, b in zip(m, q)), sum(b and not a for a, b in zip(m, q))
    from scipy.stats import binomtest

    p_value = binomtest(lost, lost + gained, 0.5).pvalue  # McNemar's exact test, computed by scipy
    n_judged = len(m)
    diffs = [int(a) - int(b) for a, b in zip(m, q)]  # +1 lost, -1 gained: the drop is their mean
    half = 1.959964 * statistics.pstdev(diffs) / n_judged**0.5
    assert lost > 0 and val["judged"]["answers_changed"] == {
        "lost": lost, "gained": gained, "p_value": pytest.approx(p_value), "questions": n_judged,
        "drop_ci95": pytest.approx([statistics.fmean(diffs) - half, statistics.fmean(diffs) + half])}
    # the answers behind those counts: the same examples, references and answers task_accuracy gave each model
    for key, wanted in (("answers_lost", (True, False)), ("answers_gained", (False, True))):
        expected = [{"index": pm.index, "reference": pm.reference, "merged": pm.prediction, "quantized": pq.prediction}
                    for pm, pq in zip(whole["merged"].predictions, whole["quantized"].predictions)
                    if (pm.exact, pq.exact) == wanted]
        assert val["judged"][key] == expected[:20]
    assert len(val["judged"]["answers_lost"]) == min(lost, 20)
    assert card.predictions["yes"]["val"]["judged_answers"]["quantized"] == [
        p.prediction for p in whole["quantized"].predictions]
    shown = render_markdown(card.data)
    first = val["judged"]["answers_lost"][0]
    assert f"answers the quantized model lost (val, first {min(5, lost)} of {lost}" in shown
    from lorakit.scorecard.report import _inline

    assert f"example {first['index']}: reference {_inline(first['reference'])}, quantized " \
           f"{_inline(first['quantized'])}" in shown
    assert _inline("a `b`\n c") == "`a 'b' c`" and _inline("x" * 100, width=10) == "`" + "x" * 9 + "…`"
    check = next(c for c in judge_scorecard(card.data) if c.check == "max_accuracy_drop")
    assert f"val, {n} questions" in check.message and check.value == val["judged"]["accuracy_drop"]
    assert f"{lost} answers lost and {gained} gained" in check.message
    check = next(c for c in judge_scorecard(card.data) if c.check == "min_retention")
    assert f"val, {n} questions" in check.message and check.value == val["judged"]["retention"]["value"]
    narrow = build_scorecard(release["base"], _tasks(release, ("yes",)), release["yes_only"], release["base"],
                             max_examples=2, judge_examples=2, **SEQ).data  # nothing beyond the table: no sample
    assert "judged" not in narrow["tasks"]["yes"]["splits"]["val"]


def test_judge_boundaries_on_hand_made_numbers():
    """Thresholds inclusive; judged on val only (a failing test split changes nothing); None reports only."""
    def split(base, adapter, merged, quantized):
        models = {"base": {"exact_match": base}, "adapter": {"exact_match": adapter},
                  "merged": {"exact_match": merged}, "quantized": {"exact_match": quantized}}
        gain = adapter - base
        value = (merged - base) / gain if gain > 0 else None
        r = {"base": base, "adapter": adapter, "merged": merged, "value": value}
        return {"accuracy_skipped": None, "models": models, "retention": {"exact_match": r},
                "accuracy_drop": merged - quantized}

    card = {"task_order": ["t"], "tasks": {"t": {"splits": {"val": split(0.0, 0.5, 0.45, 0.43),
                                                           "test": split(0.0, 0.5, 0.0, 0.0)}}}}
    checks = judge_scorecard(card, min_retention=0.9, max_accuracy_drop=0.02)
    assert [(c.check, c.passed) for c in checks] == [("min_retention", True), ("max_accuracy_drop", True)]
    checks = judge_scorecard(card, min_retention=0.91, max_accuracy_drop=0.019)
    assert [(c.check, c.passed) for c in checks] == [("min_retention", False), ("max_accuracy_drop", False)]
    card["tasks"]["t"]["splits"]["val"]["judged"] = {"n_examples": 200, "merged": 0.45, "quantized": 0.425,
                                                     "accuracy_drop": 0.025}  # the larger sample decides
    checks = judge_scorecard(card, min_retention=0.9, max_accuracy_drop=0.02)
    assert [(c.check, c.passed) for c in checks] == [("min_retention", True), ("max_accuracy_drop", False)]
    assert checks[1].value == 0.025 and "200 questions" in checks[1].message
    # a sample with the retention too (base/adapter/merged answered it) decides retention as well
    card["tasks"]["t"]["splits"]["val"]["judged"]["retention"] = {"base": 0.0, "adapter": 0.5, "merged": 0.44,
                                                                  "value": 0.88}
    checks = judge_scorecard(card, min_retention=0.9, max_accuracy_drop=0.03)
    assert [(c.check, c.passed) for c in checks] == [("min_retention", False), ("max_accuracy_drop", True)]
    assert checks[0].value == 0.88 and "200 questions" in checks[0].message
    with pytest.raises(InputError, match="min_retention"):
        judge_scorecard(card, min_retention=float("nan"))


def test_a_failed_accuracy_drop_says_when_its_split_cannot_resolve_the_bar():
    """5 of 200 lost: 2.5 points, past a 2-point bar, but its interval reaches inside it; 40 of 2,000 lost (2.0 points
    measured to about 0.6) past a 1-point bar does not."""
    from lorakit.evaluate.flips import answer_flips

    def card(lost: int, n: int) -> dict:
        merged, quantized = [True] * n, [i >= lost for i in range(n)]
        judged = {"n_examples": n, "merged": 1.0, "quantized": 1 - lost / n, "accuracy_drop": lost / n,
                  "answers_changed": answer_flips(merged, quantized).to_dict()}
        val = {"accuracy_skipped": None, "models": {}, "retention": {}, "accuracy_drop": lost / n, "judged": judged}
        return {"task_order": ["t"], "tasks": {"t": {"splits": {"val": val}}}}

    small = judge_scorecard(card(5, 200), min_retention=None, max_accuracy_drop=0.02)[0]
    assert not small.passed and "the drop's 95% interval +0.3 to +4.7 points" in small.message
    assert "cannot tell the release from one within it" in small.message and "--val-fraction" in small.message
    large = judge_scorecard(card(40, 2000), min_retention=None, max_accuracy_drop=0.01)[0]
    assert not large.passed and "cannot tell" not in large.message
    within = judge_scorecard(card(3, 200), min_retention=None, max_accuracy_drop=0.02)[0]
    assert within.passed and "cannot tell" not in within.message  # a pass needs no advice
