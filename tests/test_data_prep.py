"""Data prep: every input format, response-only masks, deterministic splits, prep.json, and each bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lorakit.data import read_texts
from lorakit.data.bundled import BUNDLED_NAMES, bundled_dataset_path
from lorakit.data.bundled.generate import GENERATORS, N_EXAMPLES, number_to_words, render_jsonl
from lorakit.data.formats import IGNORE_INDEX
from lorakit.data.prep import prepare_dataset, read_prep
from lorakit.errors import InputError
from lorakit.io.digests import sha256_file
from lorakit.train.batches import load_rows
from tests.conftest import assert_nothing_written, run_cli

INSTRUCTIONS = [{"instruction": f"Say the colour number {i}.", "input": "", "output": f"colour {i} is blue"} for i in range(20)]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                       {"role": "assistant", "content": f"Hello {i}!"}, {"role": "user", "content": "Again"},
                       {"role": "assistant", "content": f"Bye {i}."}]} for i in range(12)]
TEXTS = [{"text": f"Document number {i} talks about rivers and stones."} for i in range(15)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _labelled_texts(prep: Path, tok, split: str = "train") -> list[str]:
    """Decode each labelled run of tokens of every row."""
    rows = load_rows(prep, split)
    out = []
    for ids, labels in zip(rows.input_ids.tolist(), rows.labels.tolist()):
        run: list[int] = []
        for i, l in zip(ids, labels):
            if l != IGNORE_INDEX:
                assert l == i, "labels must be the input ids themselves (the model shifts them)"
                run.append(i)
            elif run:
                out.append(tok.decode(run))
                run = []
        if run:
            out.append(tok.decode(run))
    return out


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def test_instruction_jsonl_masks_prompt(tiny_base, tmp_path, tok):
    src = write_jsonl(tmp_path / "inst.jsonl", INSTRUCTIONS)
    res = prepare_dataset([src], tmp_path / "p", base=tiny_base, val_fraction=0.2, test_fraction=0.0, progress=False)
    assert res.format == "instruction" and res.metadata["format_detected"]
    labelled = _labelled_texts(tmp_path / "p", tok)
    # Only the assistant turn (answer + end-of-turn) carries loss; no prompt word ever does.
    assert labelled and all(t.startswith("colour ") and t.endswith("<|im_end|>\n") for t in labelled)
    assert not any("Say the" in t or "user" in t for t in labelled)
    meta = read_prep(tmp_path / "p")
    assert meta.sources[0]["sha256"] == sha256_file(src)
    assert meta.counts["train"].examples == 16 and meta.counts["val"].examples == 4
    assert meta.template == "chat_template" and meta.tokenizer["digest"]
    texts = read_texts(tmp_path / "p", "val")
    assert len(texts) == 4 and all(t.startswith("<|im_start|>user\n") for t in texts)


def test_chat_csv_masks_every_assistant_turn(tiny_base, tmp_path, tok):
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages"])
        for c in CHATS:
            w.writerow([json.dumps(c["messages"])])
    res = prepare_dataset([path], tmp_path / "p", base=tiny_base, val_fraction=0.0, test_fraction=0.0, progress=False)
    assert res.format == "chat"
    labelled = _labelled_texts(tmp_path / "p", tok)
    assert len(labelled) == 2 * len(CHATS)
    assert sorted(labelled) == sorted([f"Hello {i}!<|im_end|>\n" for i in range(12)] + [f"Bye {i}.<|im_end|>\n" for i in range(12)])


def test_text_formats_train_on_everything(tiny_base, tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(TEXTS), tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n\n\nThird.\n")
    res = prepare_dataset([tmp_path / "t.parquet", tmp_path / "t.txt"], tmp_path / "p", base=tiny_base,
                          val_fraction=0.0, test_fraction=0.0, pack=False, progress=False)
    assert res.format == "text" and res.counts["train"].examples == len(TEXTS) + 3
    rows = load_rows(tmp_path / "p")
    n = rows.attention_mask.sum(1)
    for ids, labels, k in zip(rows.input_ids, rows.labels, n):
        assert (labels[:k] == ids[:k]).all() and (labels[k:] == IGNORE_INDEX).all()
    assert "First paragraph\nstill first." in read_texts(tmp_path / "p", "train")


def test_json_list_and_explicit_format(tiny_base, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(TEXTS))
    res = prepare_dataset([tmp_path / "d.json"], tmp_path / "p", base=tiny_base, format="text", progress=False)
    assert res.format == "text" and not res.metadata["format_detected"]


def test_split_is_deterministic_and_seeded(tiny_base, tmp_path):
    src = write_jsonl(tmp_path / "inst.jsonl", INSTRUCTIONS)
    a = prepare_dataset([src], tmp_path / "a", base=tiny_base, seed=3, progress=False).metadata
    b = prepare_dataset([src], tmp_path / "b", base=tiny_base, seed=3, progress=False).metadata
    c = prepare_dataset([src], tmp_path / "c", base=tiny_base, seed=4, progress=False).metadata
    assert a["files"] == b["files"] and a["data_digest"] == b["data_digest"]
    assert read_texts(tmp_path / "a", "val") != read_texts(tmp_path / "c", "val")
    every = lambda p: [t for s in ("train", "val", "test") for t in read_texts(p, s)]  # noqa: E731
    assert sorted(every(tmp_path / "c")) == sorted(every(tmp_path / "a"))
    assert c["data_digest"] != a["data_digest"]


def test_long_examples_truncated_and_counted_or_dropped(tiny_base, tmp_path):
    records = INSTRUCTIONS[:10] + [{"instruction": "Long " * 60, "output": "x"}, {"instruction": "Hi", "output": "y" * 300}]
    src = write_jsonl(tmp_path / "long.jsonl", records)
    res = prepare_dataset([src], tmp_path / "t", base=tiny_base, max_length=128, val_fraction=0.0, test_fraction=0.0,
                          progress=False)
    c = res.counts["train"]
    assert c.truncated == 2 and c.no_loss_tokens == 1 and c.examples == 12
    assert any("truncated" in w and "long.jsonl:1" in w for w in res.warnings)
    assert load_rows(tmp_path / "t").input_ids.shape[1] == 128
    res = prepare_dataset([src], tmp_path / "d", base=tiny_base, max_length=128, val_fraction=0.0, test_fraction=0.0,
                          drop_long=True, progress=False)
    assert res.counts["train"].dropped_long == 2 and res.counts["train"].examples == 10


def test_packing_reduces_padding(tiny_base, tmp_path):
    packed = prepare_dataset(["bundled:number-words"], tmp_path / "k", base=tiny_base, progress=False)
    padded = prepare_dataset(["bundled:number-words"], tmp_path / "d", base=tiny_base, pack=False, progress=False)
    assert packed.counts["train"].tokens == padded.counts["train"].tokens
    assert packed.counts["train"].padding_fraction < padded.counts["train"].padding_fraction
    assert packed.counts["train"].rows < padded.counts["train"].rows


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: invalid JSON"),
    ("", "is empty"),
    ("\n\n", "holds no examples"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "bad.jsonl:2: field 'output' is missing"),
    ('{"question": "a", "answer": "b"}\n', "cannot tell the format"),
    ('[1, 2]\n', "expected a JSON object"),
])
def test_bad_jsonl_inputs(tiny_base, tmp_path, content, fragment):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        prepare_dataset([src], tmp_path / "out", base=tiny_base, progress=False)
    assert_nothing_written(tmp_path / "out")


def test_missing_columns_named(tiny_base, tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", TEXTS)
    with pytest.raises(InputError, match=r"lacks column\(s\) instruction/prompt, output/response/completion.*it has text"):
        prepare_dataset([src], tmp_path / "out", base=tiny_base, format="instruction", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_mixed_formats_refused(tiny_base, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl", CHATS)
    with pytest.raises(InputError, match="different formats"):
        prepare_dataset([a, b], tmp_path / "out", base=tiny_base, progress=False)


def test_chat_without_template_refused(tiny_base, tmp_path):
    import shutil

    base = tmp_path / "notemplate"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    src = write_jsonl(tmp_path / "c.jsonl", CHATS)
    with pytest.raises(InputError, match="chat data needs a chat template"):
        prepare_dataset([src], tmp_path / "out", base=base, progress=False)
    assert_nothing_written(tmp_path / "out")
    # Instruction data still works without a template: the Alpaca prompt is used, and recorded.
    res = prepare_dataset([write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)], tmp_path / "ok", base=base, progress=False)
    assert res.metadata["template"] == "alpaca"
    assert read_texts(tmp_path / "ok", "train")[0].startswith("Below is an instruction")


def test_unknown_hub_name_fails_clearly_offline(tiny_base, tmp_path):
    with pytest.raises(InputError, match="could not be loaded with datasets.load_dataset"):
        prepare_dataset(["no-such-org/no-such-dataset"], tmp_path / "out", base=tiny_base, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        prepare_dataset(["./missing.jsonl"], tmp_path / "out", base=tiny_base, progress=False)


def test_bundled_files_are_what_the_generator_makes():
    total = 0
    for name in BUNDLED_NAMES:
        path = bundled_dataset_path(name)
        assert path.read_bytes() == render_jsonl(GENERATORS[name]())
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == N_EXAMPLES and len({r["input"] for r in records}) == len(records)
        total += path.stat().st_size
    assert total < 600_000  # shipped in the wheel: a few hundred KB, like the general-text corpus
    assert number_to_words(347) == "three hundred forty-seven" and number_to_words(90_015) == "ninety thousand fifteen"
    with pytest.raises(InputError, match="no bundled dataset"):
        bundled_dataset_path("nope")


@pytest.mark.slow
def test_bundled_data_with_real_smollm2_template(real_base, tmp_path):
    from transformers import AutoTokenizer

    res = prepare_dataset(["bundled:reverse-words", "bundled:number-words"], tmp_path / "p", progress=False)
    assert res.metadata["tokenizer"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert res.metadata["template"] == "chat_template"
    labelled = _labelled_texts(tmp_path / "p", AutoTokenizer.from_pretrained(real_base))
    assert labelled and all(t.endswith("<|im_end|>\n") and "<|im_start|>" not in t for t in labelled)


def test_cli_prep(tiny_base, tmp_path):
    out = tmp_path / "p"
    proc = run_cli("prep", "bundled:reverse-words", "-o", str(out), "--base", str(tiny_base), "--max-length", "256",
                   "--quiet", check=True)
    assert proc.stdout.strip() == str(out)
    assert read_prep(out).row_length == 256
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1\n')
    proc = run_cli("prep", str(bad), "-o", str(tmp_path / "x"), "--base", str(tiny_base))
    assert proc.returncode == 2 and "bad.jsonl:1: invalid JSON" in proc.stderr
    assert_nothing_written(tmp_path / "x")


# --- test split (issue 12) -------------------------------------------------------------------------------------

def test_test_split_is_seeded_disjoint_by_input_and_recorded(tiny_base, tmp_path):
    from lorakit.data.splits import pick_report_split, read_records

    # 20 distinct inputs, each asked twice with different answers: duplicates of one input must share a split.
    records = INSTRUCTIONS + [{**r, "output": r["output"] + " again"} for r in INSTRUCTIONS]
    src = write_jsonl(tmp_path / "dup.jsonl", records)
    res = prepare_dataset([src], tmp_path / "p", base=tiny_base, val_fraction=0.2, test_fraction=0.1, seed=5,
                          progress=False)
    assert res.metadata["test_fraction"] == 0.1 and read_prep(tmp_path / "p").test_fraction == 0.1
    assert (res.counts["train"].examples, res.counts["val"].examples, res.counts["test"].examples) == (28, 8, 4)
    prompts = {s: {r["text"][: r["prompt_end"]] for r in read_records(tmp_path / "p", s)} for s in ("train", "val", "test")}
    assert len(prompts["test"]) == 2 and len(prompts["val"]) == 4
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"] or prompts["val"] & prompts["test"])
    for rec in read_records(tmp_path / "p", "test"):
        assert rec["text"][rec["prompt_end"]:].startswith(rec["reference"]) and rec["reference"].startswith("colour ")
    assert pick_report_split(tmp_path / "p") == ("test", None)
    # The same inputs and seed: the same test split; test_fraction 0 keeps the pre-test-split val split.
    again = prepare_dataset([src], tmp_path / "q", base=tiny_base, val_fraction=0.2, test_fraction=0.1, seed=5,
                            progress=False)
    assert again.metadata["data_digest"] == res.metadata["data_digest"]
    old = prepare_dataset([src], tmp_path / "o", base=tiny_base, val_fraction=0.2, test_fraction=0.0, seed=5,
                          progress=False)
    assert read_texts(tmp_path / "o", "val") == read_texts(tmp_path / "p", "val")
    split, note = pick_report_split(tmp_path / "o")
    assert split == "val" and "no test split" in note and any("test split is empty" in w for w in old.warnings)


def test_prep_folder_from_before_the_test_split_reads_and_reports_val(tiny_base, tmp_path):
    """A folder written by an older lorakit (no test files, no test_fraction in prep.json) still works."""
    from lorakit.data.splits import pick_report_split

    src = write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)
    prepare_dataset([src], tmp_path / "p", base=tiny_base, progress=False)
    meta = json.loads((tmp_path / "p" / "prep.json").read_text())
    del meta["test_fraction"], meta["counts"]["test"]
    (tmp_path / "p" / "prep.json").write_text(json.dumps(meta))
    for name in ("test.parquet", "test.texts.jsonl"):
        (tmp_path / "p" / name).unlink()
    assert read_prep(tmp_path / "p").test_fraction == 0.0
    split, note = pick_report_split(tmp_path / "p")
    assert split == "val" and "reporting the val split" in note


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (0.2, 1.0), (0.1, -0.1)])
def test_bad_split_fractions_refused(tiny_base, tmp_path, val, test):
    src = write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)
    with pytest.raises(InputError, match="fraction"):
        prepare_dataset([src], tmp_path / "out", base=tiny_base, val_fraction=val, test_fraction=test, progress=False)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("task", ["reverse-words", "number-words"])
def test_fresh_questions_are_outside_the_shipped_file(task):
    """Fresh questions measure the skill: none of their inputs (nor, for reverse-words, any of their words) is in
    the bundled file, they follow the same answer rule, and they are reproducible from the seed."""
    import json

    from lorakit.data.bundled import bundled_dataset_path
    from lorakit.data.bundled.generate import fresh_records

    shipped = [json.loads(line) for line in bundled_dataset_path(task).read_text().splitlines()]
    fresh = fresh_records(task, 40)
    assert len({r["input"] for r in fresh}) == 40
    assert not {r["input"] for r in fresh} & {r["input"] for r in shipped}
    if task == "reverse-words":
        shipped_words = {w for r in shipped for w in r["input"].split()}
        assert not {w for r in fresh for w in r["input"].split()} & shipped_words
        assert all(r["output"].split() == r["input"].split()[::-1] for r in fresh)
    else:
        assert {r["instruction"] for r in fresh} == {shipped[0]["instruction"]}
    assert fresh == fresh_records(task, 40)


def test_number_mixes_draw_what_they_say():
    """The shipped magnitudes mix under-represents three- and four-digit numbers (unique numbers exhaust 0-99);
    the digits mix holds every one- and two-digit number and a near-even share of three, four and five digits.
    Counted independently of the generator's draw: by the length of each input."""
    from collections import Counter

    from lorakit.data.bundled.generate import fresh_records, number_to_words, number_words_records

    def shares(records):
        counts = Counter(len(r["input"]) for r in records)
        return {d: counts[d] / len(records) for d in range(1, 6)}

    magnitudes, digits = shares(number_words_records()), shares(number_words_records(mix="digits"))
    assert magnitudes[4] < 0.06 and magnitudes[5] > 0.5
    assert digits[1] * N_EXAMPLES == 10 and digits[2] * N_EXAMPLES == 90
    assert all(0.2 < digits[d] < 0.4 for d in (3, 4, 5))
    records = number_words_records(mix="digits")
    assert all(r["output"] == number_to_words(int(r["input"])) for r in records)
    fresh = fresh_records("number-words", 40, mix="digits")
    assert not {r["input"] for r in fresh} & {r["input"] for r in records}
    with pytest.raises(ValueError, match="unknown number mix"):
        number_words_records(10, mix="even")
