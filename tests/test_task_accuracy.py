"""Task accuracy: the scorer, prompts rendered as training rendered them, PEFT vs merged parity, bad input."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lorakit.data.prep import prepare_dataset
from lorakit.errors import InputError
from lorakit.evaluate import diff_predictions, task_accuracies, task_accuracy
from lorakit.evaluate.scoring import Normalization, exact_match, normalize, token_f1
from tests.conftest import assert_nothing_written, run_cli

CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                       {"role": "assistant", "content": f"Hello {i}!"}, {"role": "user", "content": "Again"},
                       {"role": "assistant", "content": f"Bye {i}."}]} for i in range(12)]


# --- scorer units ----------------------------------------------------------------------------------------------

def test_normalisation_and_exact_match():
    assert normalize("  a\tb \n\n c  ") == "a b c"
    assert exact_match("Paris ", "Paris") and not exact_match("paris", "Paris")
    assert exact_match("paris", "Paris", Normalization(case_insensitive=True))
    assert not exact_match("Paris.", "Paris") and exact_match("Paris.", "Paris", Normalization(strip_punctuation=True))
    assert exact_match("«Hello», world!", "hello world", Normalization(True, True))
    assert exact_match("", "  ") and not exact_match("", "x")


def test_token_f1():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("cat", "the cat sat") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))  # P 1, R 1/3
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap {a, b} = 2 of 3 each side
    assert token_f1("", "answer") == 0.0 and token_f1("answer", "") == 0.0 and token_f1("", "") == 1.0
    assert token_f1("dog", "cat") == 0.0


# --- prompts and references ------------------------------------------------------------------------------------

def test_multi_turn_chat_reference_is_last_assistant_turn_and_prompt_is_training_prefix(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    from lorakit.data.formats import IGNORE_INDEX, prompt_token_ids
    from lorakit.data.splits import read_records
    from lorakit.train.batches import load_rows

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    prepare_dataset([src], tmp_path / "p", base=tiny_base, val_fraction=0.2, test_fraction=0.2, pack=False,
                    progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    for rec in read_records(tmp_path / "p", "test"):
        assert rec["reference"].startswith("Bye ")
        prompt = tok.decode(prompt_token_ids(rec["text"], rec["prompt_end"], tok))
        assert "Hello" in prompt and prompt.endswith("Again<|im_end|>\n<|im_start|>assistant\n") and "Bye" not in prompt
    # The prompt ids are exactly the training row's ids before its last labelled run (the last assistant turn).
    rows = load_rows(tmp_path / "p", "train")
    rec = read_records(tmp_path / "p", "train")[0]
    ids, labels = rows.input_ids[0].tolist(), rows.labels[0].tolist()
    last_start = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
    assert prompt_token_ids(rec["text"], rec["prompt_end"], tok) == ids[:last_start]


# --- PEFT adapter vs the same adapter merged ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def confident_pair(tmp_path_factory):
    """A tiny base with peaked next-token distributions (lm_head scaled up, so float rounding cannot flip a greedy
    choice), a random LoRA adapter on it, and that single adapter merged into a full model by lorakit."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.merge import merge_adapters
    from lorakit.models.synthetic import make_random_adapter
    from lorakit.models.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("acc")
    raw = make_tiny_llama(root / "raw", seed=3)
    model = AutoModelForCausalLM.from_pretrained(raw)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    base = root / "base"
    shutil.copytree(raw, base)
    model.save_pretrained(base)
    adapter = make_random_adapter(base, root / "adapter", r=8, alpha=16, seed=5, scale=0.3)
    merged = merge_adapters([adapter], [1.0], root / "merged", output_kind="model", base=base, progress=False).output
    prep = prepare_dataset(["bundled:reverse-words"], root / "prep", base=base, progress=False).output
    return base, adapter, merged, prep


def test_adapter_accuracy_via_peft_equals_merged_model_prediction_for_prediction(confident_pair, tmp_path):
    base, adapter, merged, prep = confident_pair
    kw = dict(max_examples=16, batch_size=4, progress=False)
    via_peft, via_merged, plain = task_accuracies([adapter, merged, base], prep, **kw)
    assert via_peft.model["path_used"] == "dense+adapter" and via_merged.model["path_used"] == "dense"
    assert via_peft.split == "test" and via_peft.split_note is None and via_peft.n_examples == 16
    assert [p.prediction for p in via_peft.predictions] == [p.prediction for p in via_merged.predictions]
    assert diff_predictions(via_peft, via_merged) == []
    assert (via_peft.exact_match, via_peft.f1) == (via_merged.exact_match, via_merged.f1)
    # not vacuous: the models generate text, and the adapter changes what is generated
    assert sum(p.generated_tokens for p in via_peft.predictions) > 0
    assert diff_predictions(via_peft, plain), "the adapter changed no prediction; the parity above proves nothing"
    # Batching changes nothing either: one example per batch gives the same answers.
    single = task_accuracy(merged, prep, max_examples=16, batch_size=1, progress=False)
    assert [p.prediction for p in single.predictions] == [p.prediction for p in via_merged.predictions]
    # The result is plain data: JSON round trip.
    again = type(via_peft).from_dict(json.loads(json.dumps(via_peft.to_dict())))
    assert again == via_peft


@pytest.mark.parametrize("which", ["adapter", "merged"])
def test_a_shared_prompt_prefix_generates_the_tokens_full_prompts_generate(confident_pair, which):
    """The prefix-cache path (padding between the shared prefix and each prompt's rest) against plain left padding,
    token for token, on a PEFT-wrapped model and a plain one; and it really ran a shorter prefill."""
    from lorakit.data.formats import prompt_token_ids
    from lorakit.evaluate.accuracy import generate_greedy, read_task_examples, stop_token_ids
    from lorakit.evaluate.loading import describe_model, load_eval_model

    base, adapter, merged, prep = confident_pair
    loaded = load_eval_model(describe_model(adapter if which == "adapter" else merged))
    tok = loaded.tokenizer
    examples = read_task_examples(prep, "test", 12)
    prompts = [prompt_token_ids(r["text"], int(r["prompt_end"]), tok) for r in examples.records]
    assert len({len(p) for p in prompts}) > 1  # prompts of several lengths: padding really sits inside the batch
    kw = dict(stop_ids=stop_token_ids(tok, loaded.model, examples), pad_id=int(tok.pad_token_id or tok.eos_token_id),
              batch_size=6, device=loaded.device)
    limits = [12] * len(prompts)
    shared_stats, plain_stats = {}, {}
    shared = generate_greedy(loaded.model, prompts, limits, share_prefix=True, stats=shared_stats, **kw)
    plain = generate_greedy(loaded.model, prompts, limits, share_prefix=False, stats=plain_stats, **kw)
    assert shared == plain
    assert sum(len(ids) for ids, _ in plain) > 0
    assert shared_stats["prefill_tokens"] < plain_stats["prefill_tokens"] * 0.75


def test_generation_batches_keep_order_and_bound_count_and_kv_bytes():
    """Batches are consecutive runs of the length order, at most batch_size long, and each one's KV cache (every
    sequence as long as its longest prompt plus its largest answer) fits the budget; one prompt always goes."""
    from lorakit.evaluate.accuracy import generation_batches

    prompts = [[0] * n for n in (3, 5, 5, 8, 20)]
    limits = [4, 4, 10, 4, 4]
    order = list(range(5))
    assert generation_batches(order, prompts, limits, 128, 0) == [order]  # no KV size known: batch_size only
    assert generation_batches(order, prompts, limits, 2, 1) == [[0, 1], [2, 3], [4]]
    budget = 2 * (5 + 10)  # two sequences of 15 tokens at 1 byte each
    got = generation_batches(order, prompts, limits, 128, 1, budget)
    assert got == [[0, 1], [2], [3], [4]] and sum(got, []) == order
    for batch in got[:-1]:
        width = max(len(prompts[i]) for i in batch) + max(limits[i] for i in batch)
        assert len(batch) * width <= budget
    assert generation_batches(order, prompts, limits, 128, 1, 1) == [[i] for i in order]  # too big alone: still runs


def test_a_kv_budget_that_splits_batches_changes_no_answer(confident_pair, monkeypatch):
    """The memory bound changes time only: the same greedy answers with batches cut to a single prompt."""
    from lorakit.evaluate import accuracy

    base, adapter, merged, prep = confident_pair
    whole = task_accuracy(merged, prep, max_examples=16, batch_size=16, progress=False)
    monkeypatch.setattr(accuracy, "KV_CACHE_BUDGET", 1)
    cut = task_accuracy(merged, prep, max_examples=16, batch_size=16, progress=False)
    assert [p.prediction for p in cut.predictions] == [p.prediction for p in whole.predictions]
    assert sum(p.generated_tokens for p in whole.predictions) > 0
    from lorakit.evaluate.loading import describe_model, load_eval_model

    # not vacuous: the model's KV size is known, so a 1-byte budget really cut every batch to one prompt
    assert accuracy.kv_bytes_per_token(load_eval_model(describe_model(merged)).model) > 0


def test_greedy_answers_stop_at_end_of_turn_and_respect_the_length_budget(confident_pair):
    base, _, _, prep = confident_pair
    r = task_accuracy(base, prep, max_examples=8, margin=3, progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in r.decoding["stop_token_ids"] and tok.eos_token_id in r.decoding["stop_token_ids"]
    for p in r.predictions:
        budget = len(tok(p.reference, add_special_tokens=False)["input_ids"]) + 3
        assert p.generated_tokens <= budget and (p.stop == "eos" or p.generated_tokens == budget)


# --- bad input ---------------------------------------------------------------------------------------------------

def test_text_format_data_is_a_labelled_skip(tiny_base, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document {i} about rivers."}) + "\n" for i in range(12)))
    prepare_dataset([src], tmp_path / "p", base=tiny_base, progress=False)
    r = task_accuracy(tiny_base, tmp_path / "p", progress=False)
    assert r.skipped and "no reference answers" in r.skipped and r.exact_match is None and r.n_examples == 0
    proc = run_cli("eval", str(tiny_base), "--data", str(tmp_path / "p"), "--tasks", "-q")
    assert proc.returncode == 0 and "skipped" in proc.stdout and "no reference answers" in proc.stdout


def test_folder_without_test_split_uses_val_and_says_so(tiny_base, tmp_path):
    prepare_dataset(["bundled:number-words"], tmp_path / "p", base=tiny_base, test_fraction=0.0, progress=False)
    r = task_accuracy(tiny_base, tmp_path / "p", max_examples=4, progress=False)
    assert r.split == "val" and "no test split" in r.split_note and r.n_examples == 4
    out = tmp_path / "answers.json"
    proc = run_cli("eval", str(tiny_base), "--data", str(tmp_path / "p"), "--tasks", "--max-examples", "3", "-q",
                   "--gen-batch-size", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "no test split" in proc.stderr and "reporting the val split" in proc.stderr
    saved = json.loads(out.read_text())["results"][0]
    assert saved["split"] == "val" and len(saved["predictions"]) == 3 and saved["split_note"]
    assert saved["decoding"]["batch_size"] == 2  # --gen-batch-size, not the perplexity windows' --batch-size
    with pytest.raises(InputError, match="batch_size in Python"):  # the API's own name, beside the CLI's
        task_accuracy(tiny_base, tmp_path / "p", max_examples=2, batch_size=0, progress=False)


def test_model_with_another_tokenizer_is_one_clear_error_and_nothing_written(tiny_base, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|im_end|>"  # other special ids: other prompts and stops
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    prepare_dataset(["bundled:number-words"], tmp_path / "p", base=tiny_base, progress=False)
    with pytest.raises(InputError, match="different tokenizer"):
        task_accuracies([tiny_base, other], tmp_path / "p", progress=False)
    with pytest.raises(InputError, match="prepared with"):  # one model, but not the data's tokenizer
        task_accuracy(other, tmp_path / "p", progress=False)
    out = tmp_path / "answers.json"
    start = time.perf_counter()
    proc = run_cli("eval", str(tiny_base), str(other), "--data", str(tmp_path / "p"), "--tasks", "--json", str(out))
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert_nothing_written(out)
    assert time.perf_counter() - start < 60
    with pytest.raises(InputError, match="prepared-data folder"):
        task_accuracy(tiny_base, tmp_path / "nothing.txt", progress=False)


# --- the real model (slow) ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_base_smollm2_scores_near_zero_on_reverse_words_and_reports_speed(real_base, tmp_path):
    prepare_dataset(["bundled:reverse-words"], tmp_path / "p", progress=False)
    r = task_accuracy(None, tmp_path / "p", batch_size=8, max_examples=40, progress=False)
    print(f"\nSmolLM2-135M base on reverse-words test: {r.n_examples} examples, exact {r.exact_match:.2%}, "
          f"F1 {r.f1:.3f}, {r.wall_s:.1f} s, {r.examples_per_s:.2f} ex/s, {r.generated_tokens_per_s:.1f} tok/s")
    assert r.split == "test" and r.n_examples >= 10
    assert r.exact_match <= 0.2  # NOTES: the base gets 0% on fresh reverse-words questions
    assert sum(p.generated_tokens for p in r.predictions) > 0 and all(p.prompt_tokens > 0 for p in r.predictions)
    assert r.examples_per_s > 0.2, "task accuracy on the 135M model should take seconds per example at most"
