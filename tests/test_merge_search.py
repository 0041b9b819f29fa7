"""``lorakit merge --search``: weights chosen on val by the worst task's retention, on a tiny model.

The two tasks and adapters are built so that the answer is known in kind. Task "letters" is text over a-m, task
"digits" text over 0-9 (the tiny models' byte tokenizer makes every character one token). Each adapter is a
rank-1 LoRA on ``lm_head`` whose factors are set by hand: A reads the mean direction of the final hidden states
(so A·h is about the same positive number at every position) and B adds to the logits of its task's characters.
Each adapter therefore lowers the NLL of its own task and raises the other's, and the digits adapter is the
weaker one (smaller B), so uniform weights keep little of it: the search has to give it the larger weight.
References (retention, NLL) are recomputed here from ``lorakit.evaluate.perplexity`` of folders written by the
normal merge path and of the PEFT adapters themselves, not from the search's own evaluator.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import InputError
from lorakit.merge.simplex import Exhausted, minimize
from tests.conftest import assert_nothing_written, run_cli

SEQ_LEN = 64
TASKS = {"letters": "abcdefghijklm", "digits": "0123456789"}
STRENGTH = {"letters": 2.0, "digits": 0.7}


def _text(chars: str, seed: int, n_words: int = 40) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(chars) for _ in range(rng.randint(2, 6))) for _ in range(n_words))


def _prep(path: Path, chars: str, seed: int) -> Path:
    """A prepared-data folder (the split files lorakit/data/splits.py defines), train/val/test disjoint by seed."""
    path.mkdir(parents=True)
    (path / "prep.json").write_text(json.dumps({"made_by": "tests"}))
    for k, split in enumerate(("train", "val", "test")):
        with open(path / f"{split}.texts.jsonl", "w", encoding="utf-8") as fh:
            for j in range(2):
                fh.write(json.dumps({"text": _text(chars, seed * 100 + k * 10 + j)}) + "\n")
    return path


def _task_adapter(base: Path, out: Path, chars: str, strength: float, direction: torch.Tensor, scale: float,
                  model) -> Path:
    from transformers import AutoTokenizer

    from lorakit.models.synthetic import make_random_adapter

    make_random_adapter(base, out, r=1, alpha=1, target_modules=["lm_head"], seed=1, model=model)
    tok = AutoTokenizer.from_pretrained(base)
    tensors = load_file(out / "adapter_model.safetensors")
    key_a = next(k for k in tensors if "lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    tensors[key_a] = direction[None, :].clone()
    B = torch.zeros_like(tensors[key_b])
    for ch in chars:
        B[tok.convert_tokens_to_ids(ch), 0] = strength / scale
    tensors[key_b] = B
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("merge-search")
    preps = {name: _prep(root / f"prep-{name}", chars, seed) for seed, (name, chars) in enumerate(TASKS.items(), 1)}
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    hidden = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: hidden.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for p in preps.values():
            model(tok((p / "train.texts.jsonl").read_text(), return_tensors="pt").input_ids[:, :256])
    hook.remove()
    h = torch.cat(hidden)
    direction = h.mean(0) / h.mean(0).norm()
    scale = float((h @ direction).mean())
    assert scale > 0
    adapters = [_task_adapter(tiny_base, root / f"adapter-{n}", TASKS[n], STRENGTH[n], direction, scale, model)
                for n in TASKS]
    return {"root": root, "base": tiny_base, "preps": preps, "adapters": adapters,
            "data": [f"{n}={p}" for n, p in preps.items()]}


@pytest.fixture(scope="module")
def searched(setup) -> dict:
    from lorakit.merge.search import search_merge

    out = setup["root"] / "searched"
    result = search_merge(setup["adapters"], setup["data"], out, base=str(setup["base"]), output_kind="model",
                          seq_len=SEQ_LEN, max_trials=14, progress=False)
    return {"out": out, "meta": result.metadata, "search": result.metadata["search"]}


def _nll(model_dir, prep: Path | list[str], base=None) -> float:
    from lorakit.evaluate import perplexity

    return perplexity(str(model_dir), prep if isinstance(prep, list) else str(prep), seq_len=SEQ_LEN, base=base, progress=False, device="cpu").mean_nll


def test_search_beats_uniform_on_worst_task_retention(searched):
    s = searched["search"]
    chosen, uniform = s["trials"][s["chosen"]], s["trials"][s["uniform"]]
    assert uniform["params"]["weights"] == [0.5, 0.5] and uniform["role"] == "uniform" and uniform["index"] == 0
    assert chosen["worst_retention"] > uniform["worst_retention"] + 0.2, (chosen, uniform)
    # the weaker digits adapter needs the larger weight
    assert chosen["params"]["weights"][1] > chosen["params"]["weights"][0]
    # held-out test: reported for both, and the choice holds there too
    assert s["report"]["test"]["chosen"] > s["report"]["test"]["uniform"] + 0.2
    assert searched["meta"]["weights"] == chosen["params"]["weights"]
    # the record's wall time is the stage's: the search and the write after it (the release report shows it)
    assert searched["meta"]["wall_time_s"] >= s["search_s"] >= sum(t["seconds"]["total"] for t in s["trials"])
    for t in s["trials"]:
        assert set(t["nll"]) == set(t["retention"]) == set(TASKS)
        assert t["worst_retention"] == min(t["retention"].values())
        assert t["seconds"]["total"] >= t["seconds"]["eval"] > 0


def test_retention_recomputed_from_independent_evaluations(setup, searched):
    """The chosen trial's numbers from `lorakit.evaluate.perplexity` of the written model, the base and the PEFT
    adapters (the definition written out here, not through lorakit.evaluate.retention)."""
    s = searched["search"]
    chosen = s["trials"][s["chosen"]]
    for (name, prep), adapter in zip(setup["preps"].items(), setup["adapters"]):
        base = _nll(setup["base"], prep)
        alone = _nll(adapter, prep, base=str(setup["base"]))
        merged = _nll(searched["out"], prep)
        assert merged == pytest.approx(chosen["nll"][name], rel=1e-6, abs=1e-6)
        assert base == pytest.approx(s["tasks"][name]["base_nll"], rel=1e-6)
        assert alone == pytest.approx(s["tasks"][name]["adapter_nll"], rel=1e-5)
        assert chosen["retention"][name] == pytest.approx((base - merged) / (base - alone), abs=1e-4)


def test_reproduced_trial_gives_identical_metrics(setup, searched):
    from lorakit.adapters import load_adapter
    from lorakit.merge.in_memory import InMemoryMerge
    from lorakit.merge.registry import get_method
    from lorakit.merge.search import Evaluator, parse_data, task_streams

    loaded = [load_adapter(a) for a in setup["adapters"]]
    tasks = task_streams(parse_data(setup["data"]), loaded, Path(setup["base"]), SEQ_LEN, None)
    ev = Evaluator(InMemoryMerge(Path(setup["base"]), loaded, torch.device("cpu")), tasks, batch_size=4)
    s = searched["search"]
    for trial in (s["trials"][s["chosen"]], s["trials"][-1]):
        nll, _ = ev.merged_scores(get_method(trial["method"]), trial["params"], "val")
        assert nll == trial["nll"]


@pytest.mark.parametrize("method,extra", [("linear", []), ("ties", ["--density", "0.4"]),
                                          ("dare_linear", ["--density", "0.5", "--seed", "3"])])
def test_in_memory_weights_equal_cli_model(tiny_base, tmp_path, method, extra):
    from lorakit.adapters import load_adapter
    from lorakit.merge.in_memory import InMemoryMerge
    from lorakit.merge.registry import get_method, resolve_params
    from lorakit.models.synthetic import make_random_adapter

    adapters = [make_random_adapter(tiny_base, tmp_path / f"a{i}", r=4, alpha=8, seed=10 + i) for i in range(2)]
    weights = [0.8125, 1.375]
    out = tmp_path / "model"
    run_cli("merge", *map(str, adapters), "-w", ",".join(map(str, weights)), "--method", method, *extra,
            "--output-kind", "model", "--base", str(tiny_base), "-o", str(out), "-q", check=True)
    given = {"density": None, "seed": None, "normalize": None}
    given.update({extra[i].lstrip("-"): float(extra[i + 1]) if extra[i] == "--density" else int(extra[i + 1])
                  for i in range(0, len(extra), 2)})
    m = get_method(method)
    params = resolve_params(m, {k: v for k, v in given.items() if any(p.name == k for p in m.params)})
    loaded = [load_adapter(a) for a in adapters]
    merge = InMemoryMerge(Path(tiny_base), loaded, torch.device("cpu"))
    merge.apply(m, weights, params)
    written = load_file(out / "model.safetensors")
    for name in merge.names:
        assert torch.allclose(merge.merged_weight(name), written[f"{name}.weight"], rtol=0, atol=1e-6), name
    merge.restore()
    original = load_file(Path(tiny_base) / "model.safetensors")
    assert all(torch.equal(merge.merged_weight(n), original[f"{n}.weight"]) for n in merge.names)


def test_max_trials_and_time_budget_are_honoured(setup, tmp_path):
    from lorakit.merge.search import search_merge

    few = search_merge(setup["adapters"], setup["data"], tmp_path / "few", base=str(setup["base"]), seq_len=SEQ_LEN,
                       max_trials=3, progress=False).metadata["search"]
    assert few["n_trials"] == 3 and few["stopped"] == {"linear": "max_trials"}
    quick = search_merge(setup["adapters"], setup["data"], tmp_path / "quick", base=str(setup["base"]),
                         seq_len=SEQ_LEN, time_budget_s=0.001, progress=False).metadata["search"]
    assert quick["n_trials"] == 1 and quick["stopped"] == {"linear": "time_budget"}
    assert quick["trials"][0]["role"] == "uniform" and quick["chosen"] == 0


def test_search_reads_val_only(setup, searched, tmp_path):
    """Replacing every test split changes no trial: the same deterministic search, the same numbers."""
    data = []
    for name, prep in setup["preps"].items():
        copy = tmp_path / name
        shutil.copytree(prep, copy)
        (copy / "test.texts.jsonl").write_text(json.dumps({"text": _text(TASKS[name], 99, 80)}) + "\n")
        data.append(f"{name}={copy}")
    from lorakit.merge.search import search_merge

    s = search_merge(setup["adapters"], data, tmp_path / "out", base=str(setup["base"]), seq_len=SEQ_LEN,
                     max_trials=5, progress=False).metadata["search"]
    first = searched["search"]["trials"][:5]
    assert [(t["params"], t["nll"]) for t in s["trials"]] == [(t["params"], t["nll"]) for t in first]
    assert s["report"]["test"] != searched["search"]["report"]["test"]


def test_impossible_target_writes_best_trial_and_says_so(setup, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("merge", *map(str, setup["adapters"]), "--search", *sum((["--data", d] for d in setup["data"]), []),
                   "--base", str(setup["base"]), "--seq-len", str(SEQ_LEN), "--max-trials", "4",
                   "--target-retention", "50", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "lorakit_merge.json").read_text())
    s = meta["search"]
    assert s["met_target"] is False and s["n_trials"] == 4
    assert s["chosen"] == max(range(4), key=lambda i: (s["trials"][i]["worst_retention"], -i))
    assert meta["weights"] == s["trials"][s["chosen"]]["params"]["weights"]
    assert "no trial reached worst-task retention 50" in proc.stderr
    assert "NOT reached" in proc.stdout and "uniform (linear, weights 0.5,0.5)" in proc.stdout
    assert "test" in proc.stdout and "chosen" in proc.stdout
    gain = s["tasks"]["digits"]
    assert f"digits {gain['base_nll']:.4f} -> {gain['adapter_nll']:.4f}" in proc.stdout


def test_refusals_write_nothing(setup, tmp_path):
    out = tmp_path / "out"
    adapters = list(map(str, setup["adapters"]))
    proc = run_cli("merge", *adapters, "--search", "--data", setup["data"][0], "--base", str(setup["base"]), "-o", str(out))
    assert proc.returncode == 2 and "one NAME=PREP per adapter" in proc.stderr
    proc = run_cli("merge", *adapters, "--data", setup["data"][0], "-o", str(out))
    assert proc.returncode == 2 and "--data applies to --search" in proc.stderr
    proc = run_cli("merge", *adapters, "--search", "-w", "1,1", *sum((["--data", d] for d in setup["data"]), []),
                   "-o", str(out))
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
    assert_nothing_written(out)
    from lorakit.merge.search import search_merge

    swapped = list(reversed(setup["data"]))  # each adapter scored on the other task: no gain to keep
    with pytest.raises(InputError, match="does not lower the val NLL"):
        search_merge(adapters, swapped, out, base=str(setup["base"]), seq_len=SEQ_LEN, progress=False)
    assert_nothing_written(out)


def test_simplex_finds_a_box_constrained_minimum_and_stops_when_told():
    def f(x):
        return (x[0] - 1.3) ** 2 + (x[1] - 3.0) ** 2  # the unconstrained minimum lies outside the box in x[1]

    x, value = minimize(f, [0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [2.0, 2.0], xtol=1e-3)
    assert x[0] == pytest.approx(1.3, abs=2e-3) and x[1] == 2.0
    calls = []

    def bounded(x):
        if len(calls) == 5:
            raise Exhausted
        calls.append(x)
        return f(x)

    with pytest.raises(Exhausted):
        minimize(bounded, [0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [2.0, 2.0])
    assert len(calls) == 5 and all(0 <= v <= 2 for x in calls for v in x)


def test_release_config_plan_and_lineage_carry_the_search(setup, tmp_path):
    """`merge: {search: {...}}` reaches the merge stage with every task's data; the merge edge's params carry the
    chosen weights and the search summary."""
    from flows.config import parse_config
    from flows.lineage import merge_params
    from flows.plan import ReleasePlan
    from tasks import stages

    datasets = [{"name": n, "files": ["x.jsonl"]} for n in TASKS]
    cfg = parse_config({"base": str(setup["base"]), "datasets": datasets, "output_dir": str(tmp_path),
                        "merge": {"method": "linear", "search": {"max_trials": 3}}, "gate": {"seq_len": SEQ_LEN}})
    with pytest.raises(InputError, match="'weights' or 'search'"):
        parse_config({"datasets": datasets, "merge": {"method": "linear", "weights": [1, 1], "search": {}}})
    plain = ReleasePlan(parse_config({"base": str(setup["base"]), "datasets": datasets, "output_dir": str(tmp_path)}))
    preps = {n: str(p) for n, p in setup["preps"].items()}
    args = ReleasePlan(cfg).merge(list(map(str, setup["adapters"])), preps)
    assert args["weights"] is None and args["params"]["search"]["data"] == preps
    assert args["params"]["search"]["objective"] == "auto"
    assert args["output"] != plain.merge(list(map(str, setup["adapters"])), preps)["output"]
    args["params"]["search"]["max_tokens"] = 200  # keep the stage quick; also proves the key is passed through
    out = stages.merge_adapters.fn(args["adapters"], args["weights"], args["output"], args["params"])
    meta = out["metadata"]
    assert meta["search"]["n_trials"] == 3 and meta["output_kind"] == "model"
    # these folders record no format (no answers known): auto runs the NLL objective and says why
    assert meta["search"]["objective_name"] == "nll" and "no reference answers" in meta["search"]["objective_chosen_by"]
    assert all(t["method"] == "linear" for t in meta["search"]["trials"])
    edge = merge_params(cfg, meta)
    chosen = meta["search"]["trials"][meta["search"]["chosen"]]
    assert edge["weights"] == chosen["params"]["weights"] == meta["weights"]
    assert edge["search"]["chosen"]["weights"] == chosen["params"]["weights"]
    assert edge["search"]["worst_retention"]["val"]["chosen"] == chosen["worst_retention"]
    assert merge_params(plain.config, {"weights": [0.5, 0.5]})["weights"] == [0.5, 0.5]
    from flows.report import _merge_result

    assert _merge_result(meta) == (f"exact; searched weights {','.join(f'{w:g}' for w in chosen['params']['weights'])} "
                                   f"(worst-task retention val {chosen['worst_retention']:.3f})")


def test_ties_density_is_searched_when_not_given(setup, tmp_path):
    from lorakit.adapters import load_adapter
    from lorakit.merge.in_memory import InMemoryMerge
    from lorakit.merge.registry import get_method
    from lorakit.merge.search import Evaluator, task_streams, parse_data, search_merge

    s = search_merge(setup["adapters"], setup["data"], tmp_path / "out", base=str(setup["base"]), seq_len=SEQ_LEN,
                     methods=["linear", "ties"], max_trials=9, output_kind="model", progress=False).metadata["search"]
    ties = [t for t in s["trials"] if t["method"] == "ties"]
    assert s["n_trials"] == 9 and len(ties) >= 4 and s["bounds"]["density"] == [0.1, 1.0]
    assert len({t["params"]["density"] for t in ties}) > 1
    assert all(0.1 <= t["params"]["density"] <= 1.0 and t["params"]["normalize"] is False for t in ties)
    loaded = [load_adapter(a) for a in setup["adapters"]]
    tasks = task_streams(parse_data(setup["data"]), loaded, Path(setup["base"]), SEQ_LEN, None)
    ev = Evaluator(InMemoryMerge(Path(setup["base"]), loaded, torch.device("cpu")), tasks, batch_size=4)
    assert ev.merged_scores(get_method("ties"), ties[-1]["params"], "val")[0] == ties[-1]["nll"]


# --- objective "accuracy": retention of greedy exact match ----------------------------------------------------------

@pytest.fixture(scope="module")
def answer_tasks(tmp_path_factory) -> dict:
    """Two adapters that really learned their task ("yes", "no"; 100% val exact match, base 0%) on a tiny base.
    Each learned to say its answer whatever the prompt, so in a merge the stronger update wins both prompts."""
    from lorakit.models.tiny import make_tiny_llama
    from tests.conftest import train_answer_tasks

    root = tmp_path_factory.mktemp("merge-search-accuracy")
    base = make_tiny_llama(root / "base", seed=0)
    tasks = train_answer_tasks(root, base, {"yes": "Answer yes.", "no": "Answer no."})
    return {"root": root, "base": base, "tasks": tasks,
            "adapters": [str(tasks[n][1]) for n in tasks], "data": [f"{n}={tasks[n][0]}" for n in tasks]}


def test_accuracy_objective_scores_what_the_written_model_answers(answer_tasks):
    """Every trial's exact match is what lorakit.evaluate.task_accuracy gives the folder the normal merge path writes
    with those weights (same answers, not just the same score); retention is recomputed from those numbers."""
    from lorakit.evaluate import task_accuracy
    from lorakit.merge import merge_adapters
    from lorakit.merge.search import search_merge

    root, base = answer_tasks["root"], answer_tasks["base"]
    result = search_merge(answer_tasks["adapters"], answer_tasks["data"], root / "searched", objective="accuracy",
                          base=str(base), output_kind="model", max_trials=5, progress=False)
    s = result.metadata["search"]
    assert s["objective_name"] == "accuracy" and s["metric"] == "exact_match" and "exact match" in s["objective"]
    assert s["n_trials"] == 5 and all(t["nll"] is None and set(t["exact_match"]) == {"yes", "no"} for t in s["trials"])
    for name, (prep, adapter) in answer_tasks["tasks"].items():
        alone = task_accuracy(adapter, prep, split="val", base=str(base), progress=False)
        plain = task_accuracy(str(base), prep, split="val", progress=False)
        assert s["tasks"][name]["adapter_exact_match"] == alone.exact_match == 1.0
        assert s["tasks"][name]["base_exact_match"] == plain.exact_match == 0.0
    # both answers cannot survive one merge: whichever update is larger answers both prompts, so each trial keeps one
    # task whole (retention 1) and the other not at all (0), and the search reports worst-task retention 0
    for t in s["trials"]:
        assert sorted(t["exact_match"].values()) == [0.0, 1.0] and t["worst_retention"] == 0.0
    for t in (s["trials"][s["chosen"]], s["trials"][-1]):
        folder = merge_adapters(answer_tasks["adapters"], t["params"]["weights"], root / f"trial-{t['index']}",
                                output_kind="model", base=str(base), progress=False).output
        for name, (prep, _) in answer_tasks["tasks"].items():
            searched_answers = task_accuracy(folder, prep, split="val", progress=False)
            assert searched_answers.exact_match == t["exact_match"][name]
            assert t["retention"][name] == (searched_answers.exact_match - 0.0) / (1.0 - 0.0)
    winner = max(s["trials"][s["chosen"]]["exact_match"], key=s["trials"][s["chosen"]]["exact_match"].get)
    on_disk = task_accuracy(result.output, answer_tasks["tasks"][winner][0], split="val", progress=False)
    assert on_disk.exact_match == 1.0
    assert s["report"]["test"]["chosen"] == 0.0 and s["test"]["base_exact_match"] == {"yes": 0.0, "no": 0.0}


def test_accuracy_objective_from_the_cli_and_its_refusals(answer_tasks, tiny_base, tmp_path):
    """`--objective accuracy` prints the exact-match gains; text data and an adapter that learned nothing are refused
    with the reason, and nothing is written."""
    from lorakit.merge.search import search_merge
    from lorakit.models.synthetic import make_random_adapter

    base = str(answer_tasks["base"])
    out = tmp_path / "m"
    data = sum((["--data", d] for d in answer_tasks["data"]), [])
    proc = run_cli("merge", *answer_tasks["adapters"], "--search", "--objective", "accuracy", *data, "--max-trials",
                   "2", "--base", base, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "on accuracy" in proc.stdout and "base -> adapter exact_match): yes 0.0000 -> 1.0000" in proc.stdout
    from lorakit.data.prep import prepare_dataset

    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps({"text": f"yes no yes item {i} and more words"}) + "\n" for i in range(60)))
    text_prep = prepare_dataset([src], tmp_path / "text-prep", base=answer_tasks["base"], progress=False).output
    with pytest.raises(InputError, match="text-format data: it has no reference answers"):
        search_merge(answer_tasks["adapters"], ["yes=" + str(text_prep), answer_tasks["data"][1]], tmp_path / "t",
                     objective="accuracy", base=base, progress=False)
    untrained = make_random_adapter(answer_tasks["base"], tmp_path / "untrained", r=2, seed=3)
    with pytest.raises(InputError, match="the adapter for no did not learn it: .* does not raise the val exact match"):
        search_merge([answer_tasks["adapters"][0], str(untrained)], answer_tasks["data"], tmp_path / "u",
                     objective="accuracy", base=base, progress=False)
    for folder in ("t", "u"):
        assert_nothing_written(tmp_path / folder)
    proc = run_cli("merge", *answer_tasks["adapters"], "--objective", "accuracy", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--objective applies to --search" in proc.stderr


def test_max_examples_scores_only_the_first_examples_of_each_split(setup, answer_tasks, tmp_path):
    """NLL on the first val text alone (lorakit.evaluate.perplexity of those words, written out here), and exact
    match on the first N val examples (the count recorded), as the scorecard reads them."""
    from lorakit.merge.search import search_merge

    s = search_merge(setup["adapters"], setup["data"], tmp_path / "nll", base=str(setup["base"]), seq_len=SEQ_LEN,
                     max_trials=1, max_examples=1, output_kind="model", progress=False).metadata["search"]
    assert s["method"]["max_examples"] == 1
    for name, prep in setup["preps"].items():
        first = json.loads((prep / "val.texts.jsonl").read_text().splitlines()[0])["text"]
        one = _nll(tmp_path / "nll", [first])
        both = _nll(tmp_path / "nll", prep)
        assert s["trials"][0]["nll"][name] == pytest.approx(one, rel=1e-6) and one != pytest.approx(both, rel=1e-3)
    acc = search_merge(answer_tasks["adapters"], answer_tasks["data"], tmp_path / "acc", objective="accuracy",
                       base=str(answer_tasks["base"]), max_trials=1, max_examples=2, progress=False).metadata["search"]
    assert {t["val_examples"] for t in acc["tasks"].values()} == {2}


def test_auto_objective_is_accuracy_where_every_task_has_answers_else_nll(answer_tasks, tmp_path):
    """The default objective: exact match on instruction data; NLL as soon as one task is text (no answers), where
    `accuracy` itself is refused (test above). The record says which ran and why."""
    from lorakit.data.prep import prepare_dataset
    from lorakit.merge.objectives import resolve_objective
    from lorakit.merge.search import search_merge

    assert resolve_objective("nll", ["chat"]) == ("nll", None)
    assert resolve_objective("auto", ["instruction", "chat"])[0] == "accuracy"
    assert resolve_objective("auto", ["instruction", "text"])[0] == "nll"
    base = str(answer_tasks["base"])
    answers = search_merge(answer_tasks["adapters"], answer_tasks["data"], tmp_path / "answers", base=base,
                           max_trials=1, max_examples=2, progress=False).metadata["search"]
    assert answers["objective_name"] == "accuracy" and answers["metric"] == "exact_match"
    assert "every task's data has reference answers" in answers["objective_chosen_by"]
    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps({"text": f"yes no yes item {i} and more words"}) + "\n" for i in range(60)))
    text_prep = prepare_dataset([src], tmp_path / "text-prep", base=answer_tasks["base"], progress=False).output
    mixed = search_merge(answer_tasks["adapters"], ["yes=" + str(text_prep), answer_tasks["data"][1]],
                         tmp_path / "mixed", base=base, max_trials=1, seq_len=64, progress=False).metadata["search"]
    assert mixed["objective_name"] == "nll" and mixed["metric"] == "nll"
    assert "format text" in mixed["objective_chosen_by"]


# --- method regmean: its projected updates weighed like plain ones ---------------------------------------------------

def test_regmean_search_weighs_the_projected_updates_and_writes_the_closed_form(setup, tmp_path):
    """Every trial is RegMean with task weights wₜ: W* = W + Σ wₜ·ΔWₜ·G̃ₜ·S⁻¹ (its fit is linear in them). The written
    model equals that closed form, computed here from PEFT's own merged task models and their hooked layer inputs
    (tests/test_merge_regmean.py's reference), at the chosen weights; its val NLL is the chosen trial's."""
    from lorakit.merge.search import search_merge
    from tests.test_merge_regmean import _reference, _shrink

    out = tmp_path / "rm"
    result = search_merge(setup["adapters"], setup["data"], out, methods=["regmean"], base=str(setup["base"]),
                          output_kind="model", seq_len=SEQ_LEN, max_trials=8, progress=False)
    meta, s = result.metadata, result.metadata["search"]
    uniform, chosen = s["trials"][s["uniform"]], s["trials"][s["chosen"]]
    # the baseline is RegMean itself (1.0 each), not the linear 1/n average
    assert uniform["method"] == "regmean" and uniform["params"]["weights"] == [1.0, 1.0] and uniform["index"] == 0
    assert s["n_trials"] == 8 and {t["method"] for t in s["trials"]} == {"regmean"}
    assert chosen["worst_retention"] > uniform["worst_retention"] + 0.05, (chosen, uniform)
    assert meta["method"] == "regmean" and meta["weights"] == chosen["params"]["weights"]
    assert meta["regmean"]["data"] == [str(p) for p in setup["preps"].values()]  # the search's own folders, in order
    assert chosen["params"]["regmean_alpha"] == 0.9 and chosen["params"]["regmean_anchor"] == 0.0
    refs = [_reference(Path(setup["base"]), a, p, 128) for a, p in zip(setup["adapters"], setup["preps"].values())]
    base = load_file(Path(setup["base"]) / "model.safetensors")["lm_head.weight"].double()
    shrunk = [_shrink(g["lm_head"]) for _, g in refs]
    updates = sum(w * (ref["lm_head"] - base) @ g for w, (ref, _), g in zip(chosen["params"]["weights"], refs, shrunk))
    expected = base + torch.linalg.solve(sum(shrunk), updates.T).T  # S symmetric: X S⁻¹ = (S⁻¹ Xᵀ)ᵀ
    got = load_file(out / "model.safetensors")["lm_head.weight"].double()
    assert torch.allclose(got, expected, rtol=0, atol=5e-5 * float(expected.abs().max())), float((got - expected).abs().max())
    for name, prep in setup["preps"].items():
        assert _nll(out, prep) == pytest.approx(chosen["nll"][name], rel=1e-5)


def test_regmean_search_from_the_cli_and_the_release_config(setup, tmp_path):
    """`--methods regmean` takes the regmean options (refused without it); a release config with method regmean and
    a `search:` mapping searches RegMean's weights, and its merge stage runs (the search's data feeds the fit)."""
    from flows.config import parse_config
    from flows.plan import ReleasePlan
    from tasks import stages

    adapters = list(map(str, setup["adapters"]))
    data = sum((["--data", d] for d in setup["data"]), [])
    common = ["--base", str(setup["base"]), "--seq-len", str(SEQ_LEN), "--max-trials", "2", "--output-kind", "model"]
    proc = run_cli("merge", *adapters, "--search", *data, *common, "--regmean-alpha", "0.5", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--methods regmean" in proc.stderr
    assert_nothing_written(tmp_path / "x")
    proc = run_cli("merge", *adapters, "--search", "--methods", "regmean", *data, *common, "--regmean-alpha", "0.5",
                   "--regmean-examples", "1", "-o", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    assert "uniform (regmean, weights 1,1)" in proc.stdout
    meta = json.loads((tmp_path / "cli" / "lorakit_merge.json").read_text())
    assert meta["regmean"]["alpha"] == 0.5 and meta["regmean"]["examples"] == 1 and meta["search"]["n_trials"] == 2

    datasets = [{"name": n, "files": ["x.jsonl"]} for n in TASKS]
    cfg = parse_config({"base": str(setup["base"]), "datasets": datasets, "output_dir": str(tmp_path),
                        "merge": {"regmean_anchor": 0, "search": {"max_trials": 2}}, "gate": {"seq_len": SEQ_LEN}})
    assert cfg.merge.method == "regmean" and cfg.merge_search().methods == ["regmean"]
    preps = {n: str(p) for n, p in setup["preps"].items()}
    args = ReleasePlan(cfg).merge(adapters, preps)
    assert "data" not in args["params"] and args["params"]["search"]["data"] == preps
    meta = stages.merge_adapters.fn(args["adapters"], args["weights"], args["output"], args["params"])["metadata"]
    assert meta["method"] == "regmean" and meta["search"]["n_trials"] == 2 and meta["regmean"]["data"] == list(preps.values())
