"""Scale tuning after rounding (lorakit.quantize.tune): only scales and norms move, the file stays a standard
checkpoint, and the tuning is kept only when it brings the model closer to the full-precision one on held-out text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import InputError
from lorakit.io.safetensors_stream import load_file
from lorakit.quantize import quantize_model, read_quant_meta
from lorakit.quantize.calibration import build_calibration
from lorakit.quantize.core import _load_tokenizer
from lorakit.quantize.options import QUANTIZE
from lorakit.quantize.tune import HOLDOUT_EVERY, tune_scales
from tests.conftest import run_cli
from tests.test_quantize import CALIB, make_prep

ROUNDED = {"gptq": {}, "awq": dict(method="awq", group_size=32)}


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return make_prep(tmp_path_factory.mktemp("prep") / "prep")


@pytest.fixture(scope="module")
def sharp_base(tmp_path_factory) -> Path:
    """The tiny model with weights drawn 5x wider (initializer_range 0.1), for the tests that claim tuning brings
    the 4-bit model closer. Why: the default tiny model's next-token distribution is nearly uniform, so 4-bit
    rounding barely moves it and 30 steps of tuning win back a sliver of that, within the float noise between CPUs
    (on one without AVX512-BF16 the rounding runs in float32, not bfloat16, and these tests' verdicts flipped). Here
    rounding costs a thousand times more KL, and tuning wins back a clear share of it in either dtype."""
    from lorakit.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "sharp", seed=0, initializer_range=0.1)


@pytest.fixture(scope="module")
def rounded(tmp_path_factory, sharp_base, prep) -> dict[str, Path]:
    """The peaked tiny model quantized without tuning: GPTQ as the release does (act-order, g16) and AWQ g32."""
    root = tmp_path_factory.mktemp("rounded")
    return {kind: quantize_model(sharp_base, root / kind, calib=prep, progress=False, **CALIB, **kw).output
            for kind, kw in ROUNDED.items()}


TUNE_BLOCKS = 32  # tuning trains on 28 of them and judges itself on 4 (every HOLDOUT_EVERY-th)


def _blocks(base: Path, prep: Path) -> torch.Tensor:
    return build_calibration(prep, _load_tokenizer(base), n_samples=TUNE_BLOCKS, seq_len=CALIB["seq_len"],
                             seed=0).blocks


def _logprobs(folder: Path, ids: torch.Tensor, dequantized: bool) -> torch.Tensor:
    """Next-token log-probabilities of a folder: as plain transformers loads it (a quantized one through its own
    kernel), or through lorakit's exact dequantizer."""
    if dequantized:
        from lorakit.evaluate.loading import describe_model, load_eval_model

        model = load_eval_model(describe_model(str(folder)), quant_path="dequantized", device="cpu",
                                dtype="float32").model
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return F.log_softmax(model.eval()(ids).logits.float(), -1)


def _held_out_kl(full: Path, quantized: Path, blocks: torch.Tensor, *, dequantized: bool = False) -> float:
    """Mean per-token KL(full || quantized) on the blocks tuning holds out, computed here from the two folders."""
    held = blocks[torch.arange(blocks.shape[0]) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    p, q = _logprobs(full, held, False), _logprobs(quantized, held, dequantized)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("kind", sorted(ROUNDED))
def test_tuning_moves_only_scales_and_norms_and_brings_held_out_text_closer(rounded, sharp_base, prep, tmp_path,
                                                                              kind):
    folder = tmp_path / kind
    shutil.copytree(rounded[kind], folder)
    blocks = _blocks(sharp_base, prep)
    record = tune_scales(sharp_base, folder, blocks, kind=kind, steps=30, lr=2e-3, progress=False)
    assert record["kept"] and record["held_out_kl_after"] < record["held_out_kl_before"]
    before, after = load_file(rounded[kind] / "model.safetensors"), load_file(folder / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(n.endswith(".scales") or "norm" in n for n in changed), sorted(changed)
    assert any(n.endswith(".scales") for n in changed) and any("norm" in n for n in changed)
    assert all(after[n].dtype == before[n].dtype for n in before)
    # the record's held-out KL is the written file's (its weights dequantized exactly, in float32) ...
    for path, key in ((folder, "held_out_kl_after"), (rounded[kind], "held_out_kl_before")):
        assert _held_out_kl(sharp_base, path, blocks, dequantized=True) == pytest.approx(record[key], rel=1e-3)
    # ... and as a user loads the folders (plain transformers, the quantized kernel), the tuned one is closer
    assert _held_out_kl(sharp_base, folder, blocks) < _held_out_kl(sharp_base, rounded[kind], blocks)


def _unpack_4bit(words: torch.Tensor, kind: str) -> torch.Tensor:
    """A 4-bit qweight's codes q [in, out], unpacked here with plain shifts (not lorakit's readers): GPTQ packs 8
    input rows per int32 word along dim 0, AWQ 8 output columns per word along dim 1, nibble k holding column
    AWQ's order[k]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(w >> (4 * k)) & 15 for k in range(8)], dim=-1)  # [..., 8]
    if kind == "gptq":  # [in/8, out, 8] -> [in, out]
        return nibbles.permute(0, 2, 1).reshape(w.shape[0] * 8, w.shape[1])
    columns = torch.empty_like(nibbles)  # [in, out/8, 8]: nibble k is column 8·word + (0, 2, 4, 6, 1, 3, 5, 7)[k]
    columns[..., [0, 2, 4, 6, 1, 3, 5, 7]] = nibbles
    return columns.reshape(w.shape[0], w.shape[1] * 8)


def _stored_codes(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """Every quantized linear's codes q [in, out] in a folder's checkpoint."""
    return {name: _unpack_4bit(words, kind) for name, words in load_file(folder / "model.safetensors").items()
            if name.endswith(".qweight")}


@pytest.mark.parametrize("kind", sorted(ROUNDED))
def test_packing_codes_writes_the_layouts_words(rounded, kind):
    """pack_qweight (what learnt rounding writes back) gives the words the layout's own bit order holds, for codes
    drawn at random and for a real checkpoint's codes (which it must give back word for word)."""
    from lorakit.quantize.layouts import pack_qweight

    q = torch.randint(0, 16, (64, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_unpack_4bit(pack_qweight(kind, q, 4), kind), q)
    for name, words in load_file(rounded[kind] / "model.safetensors").items():
        if name.endswith(".qweight"):
            assert torch.equal(pack_qweight(kind, _unpack_4bit(words, kind), 4), words), name


def test_learnt_rounding_moves_codes_one_step_and_the_file_is_what_was_measured(rounded, sharp_base, prep, tmp_path):
    """Rounding learnt with the scales (``rounding_lr``): from a GPTQ model with 2% of its codes pushed one step
    up, the tuning moves codes, by one step at most and within 4 bits, rewrites only qweight, scales and norms, and
    the file it writes is the model it measured. (The AWQ writer is the packing test's; learnt rounding is not kept
    on this AWQ model: its held-out KL rose.)"""
    from safetensors.torch import save_file

    from lorakit.quantize.layouts import pack_qweight

    kind = "gptq"
    folder = tmp_path / kind
    shutil.copytree(rounded[kind], folder)
    tensors, generator = dict(load_file(folder / "model.safetensors")), torch.Generator().manual_seed(0)
    for name, q in _stored_codes(folder, kind).items():
        tensors[name] = pack_qweight(kind, q + ((torch.rand(q.shape, generator=generator) < 0.02) & (q < 15)).long(), 4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    pushed = tmp_path / f"{kind}-pushed"
    shutil.copytree(folder, pushed)
    blocks = _blocks(sharp_base, prep)
    record = tune_scales(sharp_base, folder, blocks, kind=kind, steps=30, lr=2e-3, rounding_lr=0.05,
                         progress=False)
    assert record["kept"] and record["held_out_kl_after"] < record["held_out_kl_before"]
    assert "rounding" in record["trained"] and record["rounding_lr"] == 0.05
    before, after = load_file(pushed / "model.safetensors"), load_file(folder / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert all(n.endswith((".scales", ".qweight")) or "norm" in n for n in changed), sorted(changed)
    assert all(after[n].dtype == before[n].dtype and after[n].shape == before[n].shape for n in before)
    old, new = _stored_codes(pushed, kind), _stored_codes(folder, kind)
    assert sum(int((old[n] != new[n]).sum()) for n in old) == record["codes_moved"] > 0
    assert all(int((old[n] - new[n]).abs().max()) <= 1 and 0 <= int(new[n].min()) <= int(new[n].max()) <= 15
               for n in old)
    # the record's held-out KL is the written file's, and plain transformers reads it closer than the pushed one
    assert _held_out_kl(sharp_base, folder, blocks, dequantized=True) == pytest.approx(record["held_out_kl_after"],
                                                                                        rel=1e-3)
    assert _held_out_kl(sharp_base, folder, blocks) < _held_out_kl(sharp_base, pushed, blocks)


def test_tuning_that_does_not_help_on_held_out_text_leaves_the_file_as_rounded(rounded, sharp_base, prep, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(rounded["gptq"], folder)
    record = tune_scales(sharp_base, folder, _blocks(sharp_base, prep), kind="gptq", steps=3, lr=5.0, progress=False)
    assert not record["kept"] and record["held_out_kl_after"] > record["held_out_kl_before"]
    assert (folder / "model.safetensors").read_bytes() == (rounded["gptq"] / "model.safetensors").read_bytes()


def test_quantize_with_tuning_records_it_and_refuses_bad_settings_first(tiny_base, prep, tmp_path):
    out = tmp_path / "q"
    proc = run_cli("quantize", str(tiny_base), "-o", str(out), "--calib", str(prep), "--n-samples", "8",
                   "--seq-len", "64", "--calib-general", "none", "--tune-steps", "10", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = read_quant_meta(out)
    assert meta.params.tune_steps == 10 and meta.tuning["steps"] == 10
    assert meta.used_settings()["tune_steps"] == 10
    assert meta.tuning["train_blocks"] + meta.tuning["held_out_blocks"] == CALIB["n_samples"]
    assert meta.tuning["lr"] == pytest.approx(QUANTIZE.tune_lr)
    with pytest.raises(InputError, match="--tune-steps"):
        quantize_model(tiny_base, tmp_path / "bad", calib=prep, progress=False, tune_steps=5, tune_lr=0, **CALIB)
    bad = run_cli("quantize", str(tiny_base), "-o", str(tmp_path / "bad"), "--calib", str(prep),
                  "--tune-steps", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "tune" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_tuning_on_the_tasks_alone_watches_the_general_blocks_the_rounding_used(tiny_base, prep, tmp_path):
    """Calibrated on half general text, tuned on the tasks' data alone (the default share): every tuning block is
    task text, drawn before any rounding, and the calibration's general blocks are watched, not trained on."""
    mixed = dict(CALIB, calib_general="default", calib_general_fraction=0.5)
    out = quantize_model(tiny_base, tmp_path / "q", calib=prep, progress=False, tune_steps=5, **mixed).output
    tuning = read_quant_meta(out).tuning
    assert tuning["general_fraction"] == 0.0
    assert tuning["train_blocks"] + tuning["held_out_blocks"] == CALIB["n_samples"]  # all of them task blocks
    assert tuning["general_blocks_watched"] == 1 and tuning["general_kl_before"] > 0  # 4 general blocks, every 8th
    with pytest.raises(InputError, match="tune-general-fraction needs general text"):
        quantize_model(tiny_base, tmp_path / "bad", calib=prep, progress=False, tune_steps=5,
                       tune_general_fraction=0.5, **CALIB)
    with pytest.raises(InputError, match="n-samples"):  # too little task data for the tuning blocks: refused first
        quantize_model(tiny_base, tmp_path / "bad", calib=prep, progress=False, tune_steps=5,
                       **dict(mixed, n_samples=_task_blocks_available(tiny_base, prep) + 2))
    assert not (tmp_path / "bad").exists()


def _task_blocks_available(tiny_base: Path, prep: Path) -> int:
    from lorakit.quantize.calibration import load_texts

    texts = load_texts(prep)[0]
    tokens = sum(len(_load_tokenizer(tiny_base)(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    return tokens // CALIB["seq_len"]


def test_the_quantization_search_tunes_every_trial_it_is_given(tiny_base, prep, tmp_path):
    from lorakit.quantize.search import quantize_to_target

    params = {**QUANTIZE.quantize_kwargs(), **CALIB, "tune_steps": 5, "calib": str(prep), "progress": False}
    result = quantize_to_target(tiny_base, tmp_path / "q", target_degradation=0.99, max_trials=1, **params)
    meta = read_quant_meta(result.output)
    assert meta.search["trials"][0]["params"]["tune_steps"] == 5 and meta.tuning["steps"] == 5


# ---- tuning on the answers: the KL where a task's answer (and its end) is decided -------------------------------

TASK_CALIB = dict(n_samples=16, seq_len=128, calib_general=None)
TUNE_CALIB = dict(TASK_CALIB, n_samples=TUNE_BLOCKS)  # where tuning must show a gain on its 4 held-out blocks


@pytest.fixture(scope="module")
def task_prep(tmp_path_factory, tiny_base) -> Path:
    """A real instruction dataset prepared for the tiny model: its texts carry where each answer starts."""
    from lorakit.data.prep import prepare_dataset

    return prepare_dataset(["bundled:reverse-words"], tmp_path_factory.mktemp("task") / "prep", base=tiny_base,
                           progress=False).output


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-d mask."""
    runs, start = [], None
    for i, on in enumerate(mask.tolist() + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_the_answer_mask_marks_every_answer_and_leaves_the_tokens_as_they_were(tiny_base, task_prep, tmp_path):
    tok = _load_tokenizer(tiny_base)
    cal = build_calibration(task_prep, tok, seed=0, **{k: v for k, v in TASK_CALIB.items() if k != "calib_general"})
    from lorakit.data.splits import read_records

    answers = {r["text"][r["prompt_end"]:] for r in read_records(task_prep, "train")}
    seen = 0
    for ids, mask in zip(cal.blocks, cal.answer_mask):
        for start, end in _runs(mask):
            if 0 < start and end < len(mask):  # a whole answer inside the block: exactly one example's answer
                assert tok.decode(ids[start:end].tolist()) in answers
                seen += 1
    assert seen >= cal.blocks.shape[0]  # every block of this data holds at least one whole answer
    assert cal.summary()["answer_tokens"] == int(cal.answer_mask.sum())
    # the same texts without answer offsets (text data) give the same token blocks and no mask
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "prep.json").write_text((task_prep / "prep.json").read_text())
    with open(plain / "train.texts.jsonl", "w") as fh:
        for r in read_records(task_prep, "train"):
            fh.write(json.dumps({"text": r["text"]}) + "\n")
    other = build_calibration(plain, tok, seed=0, **{k: v for k, v in TASK_CALIB.items() if k != "calib_general"})
    assert torch.equal(other.blocks, cal.blocks) and other.tokens_digest == cal.tokens_digest
    assert other.answer_mask is None and other.summary()["answer_tokens"] is None


def test_tuning_on_answers_judges_itself_on_the_held_out_answers(sharp_base, task_prep, tmp_path):
    rounded = quantize_model(sharp_base, tmp_path / "rounded", calib=task_prep, progress=False, **TUNE_CALIB).output
    folder = tmp_path / "tuned"
    shutil.copytree(rounded, folder)
    cal = build_calibration(task_prep, _load_tokenizer(sharp_base), seed=0,
                            **{k: v for k, v in TUNE_CALIB.items() if k != "calib_general"})
    record = tune_scales(sharp_base, folder, cal.blocks, kind="gptq", steps=30, lr=2e-3, tokens="answers",
                         answer_mask=cal.answer_mask, progress=False)
    assert record["tokens"] == "answers" and "tokens_note" not in record
    assert record["kept"] and record["held_out_answer_kl_after"] < record["held_out_answer_kl_before"]
    # the record's answer KL is the written files' KL at the positions whose next token is an answer token
    held = torch.arange(cal.blocks.shape[0]) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    ids, next_is_answer = cal.blocks[held], cal.answer_mask[held][:, 1:]
    assert int(next_is_answer.sum()) == record["held_out_answer_positions"] > 0
    p = _logprobs(sharp_base, ids, False)[:, :-1]
    for path, key in ((folder, "held_out_answer_kl_after"), (rounded, "held_out_answer_kl_before")):
        q = _logprobs(path, ids, True)[:, :-1]
        kl = (p.exp() * (p - q)).sum(-1)[next_is_answer].mean()
        assert float(kl) == pytest.approx(record[key], rel=1e-3)


def test_tuning_with_answers_weighed_up_judges_itself_on_the_weighted_held_out_kl(sharp_base, task_prep, tmp_path):
    rounded = quantize_model(sharp_base, tmp_path / "rounded", calib=task_prep, progress=False, **TUNE_CALIB).output
    folder = tmp_path / "tuned"
    shutil.copytree(rounded, folder)
    cal = build_calibration(task_prep, _load_tokenizer(sharp_base), seed=0,
                            **{k: v for k, v in TUNE_CALIB.items() if k != "calib_general"})
    record = tune_scales(sharp_base, folder, cal.blocks, kind="gptq", steps=30, lr=2e-3, answer_weight=4.0,
                         answer_mask=cal.answer_mask, progress=False)
    assert record["tokens"] == "all" and record["answer_weight"] == 4.0 and "tokens_note" not in record
    assert record["kept"] and record["held_out_weighted_kl_after"] < record["held_out_weighted_kl_before"]
    # the weighted KL, from the written files: every position counts 1, one whose next token is an answer token 4
    held = torch.arange(cal.blocks.shape[0]) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    ids = cal.blocks[held]
    weight = torch.ones(ids.shape)
    weight[:, :-1] += 3.0 * cal.answer_mask[held][:, 1:].float()
    p = _logprobs(sharp_base, ids, False)
    for path, key in ((folder, "held_out_weighted_kl_after"), (rounded, "held_out_weighted_kl_before")):
        q = _logprobs(path, ids, True)
        kl = (p.exp() * (p - q)).sum(-1)
        assert float((kl * weight).sum() / weight.sum()) == pytest.approx(record[key], rel=1e-3)
        assert float(kl.mean()) == pytest.approx(record[key.replace("weighted_", "")], rel=1e-3)
    for bad, what in (({"answer_weight": 0.5}, "at least 1"), ({"answer_weight": 2.0, "tokens": "answers"}, "all")):
        with pytest.raises(InputError, match=what):
            tune_scales(sharp_base, folder, cal.blocks, kind="gptq", steps=1, lr=2e-3, answer_mask=cal.answer_mask,
                        progress=False, **bad)


def test_tuning_draws_its_own_number_of_blocks_and_records_it(tiny_base, task_prep, tmp_path):
    out = quantize_model(tiny_base, tmp_path / "q", calib=task_prep, progress=False, tune_steps=2, tune_samples=24,
                         **TASK_CALIB).output
    meta = read_quant_meta(out)
    assert meta.params.n_samples == 16 and meta.params.tune_samples == 24
    assert meta.tuning["train_blocks"] + meta.tuning["held_out_blocks"] == 24 and meta.tuning["held_out_blocks"] == 3
    assert meta.used_settings()["tune_samples"] == 24
    # tuned on every position alike, judged there; the answer positions' KL is recorded beside it
    assert meta.tuning["tokens"] == "all" and "answer_weight" not in meta.tuning
    assert meta.tuning["held_out_answer_positions"] > 0 and "held_out_answer_kl_after" in meta.tuning
    assert meta.tuning["kept"] == (meta.tuning["held_out_kl_after"] < meta.tuning["held_out_kl_before"])
    assert len(meta.tuning["loss_by_tenth"]) == 2  # 2 steps: one part each
    # the calibration's own 16 blocks are the first 16 of the 24 (one shuffle, one token stream)
    tok = _load_tokenizer(tiny_base)
    cal_kw = {k: v for k, v in TASK_CALIB.items() if k not in ("calib_general", "n_samples")}
    small = build_calibration(task_prep, tok, seed=0, n_samples=16, **cal_kw)
    large = build_calibration(task_prep, tok, seed=0, n_samples=24, **cal_kw)
    assert torch.equal(large.blocks[:16], small.blocks)


def test_tuning_on_answers_of_data_without_answers_tunes_every_token_and_says_so(tiny_base, task_prep, prep,
                                                                                tmp_path):
    out = tmp_path / "q"
    proc = run_cli("quantize", str(tiny_base), "-o", str(out), "--calib", str(prep), "--n-samples", "8",
                   "--seq-len", "64", "--calib-general", "none", "--tune-steps", "3", "--tune-tokens", "answers",
                   "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = read_quant_meta(out)
    assert meta.params.tune_tokens == "answers" and meta.tuning["tokens"] == "all"
    assert "no answers" in meta.tuning["tokens_note"] and any("no answers" in n for n in meta.notes)
    assert meta.used_settings()["tune_tokens"] == "all"
    answered = quantize_model(tiny_base, tmp_path / "a", calib=task_prep, progress=False, tune_steps=3,
                              tune_tokens="answers", **TASK_CALIB).output
    assert read_quant_meta(answered).used_settings()["tune_tokens"] == "answers"
    bad = run_cli("quantize", str(tiny_base), "-o", str(tmp_path / "bad"), "--calib", str(prep),
                  "--tune-tokens", "prompts", cwd=tmp_path)
    assert bad.returncode == 2 and "tune-tokens" in bad.stderr
    assert not (tmp_path / "bad").exists()
    both = run_cli("quantize", str(tiny_base), "-o", str(tmp_path / "both"), "--calib", str(prep), "--tune-steps",
                   "3", "--tune-tokens", "answers", "--tune-answer-weight", "4", cwd=tmp_path)
    assert both.returncode == 2 and "tune-answer-weight" in both.stderr and not (tmp_path / "both").exists()


def test_tuning_that_cannot_fit_in_memory_is_refused_before_rounding(tiny_base, prep, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lorakit import runtime
    from lorakit.quantize.tune import BYTES_PER_PARAM, LOGIT_COPIES, memory_bytes
    from tests.conftest import assert_nothing_written

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    need = memory_bytes(tiny_base, seq_len=64, blocks=CALIB["n_samples"])  # tuning reads the calibration's blocks
    assert need["weights"] == int(BYTES_PER_PARAM * sum(p.numel() for p in model.parameters()))
    assert need["logits"] == LOGIT_COPIES * 4 * (4 * 64) * model.config.vocab_size
    assert need["teacher_states"] == 4 * CALIB["n_samples"] * 64 * model.config.hidden_size
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: sum(need.values()) - 1)
    out = tmp_path / "q"
    with pytest.raises(InputError, match=r"scale tuning needs about .*\(--tune-steps 0\)"):
        quantize_model(tiny_base, out, calib=prep, progress=False, tune_steps=2, device="cpu", **CALIB)
    assert_nothing_written(out)
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: sum(need.values()))
    assert quantize_model(tiny_base, out, calib=prep, progress=False, tune_steps=2, device="cpu", **CALIB).output == out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_targets_are_the_teachers_own_log_probs(tiny_tied_base, dtype):
    """The cached teacher (final hidden states once, the head per step) gives each drawn row the log-probabilities
    the whole teacher gives it, whatever rows share the draw; recomputed here by the model's own forward pass."""
    from transformers import AutoModelForCausalLM

    from lorakit.quantize.tune import _TeacherTargets

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_tied_base)).eval()
    blocks = torch.randint(0, teacher.config.vocab_size, (10, 32), generator=torch.Generator().manual_seed(0))
    targets = _TeacherTargets(teacher, blocks, batch_size=4, dtype=dtype, draws=40)
    assert targets.cached
    assert not _TeacherTargets(teacher, blocks, batch_size=4, dtype=dtype, draws=10).cached  # drawn once: no gain
    rows = torch.tensor([7, 2, 2, 9])
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        want = torch.log_softmax(teacher(blocks[rows]).logits.float(), dim=-1)
    torch.testing.assert_close(targets.log_probs(rows), want)


def test_a_teacher_whose_logits_are_more_than_its_head_runs_whole(tmp_path):
    """Gemma 2 caps its logits after the head: the cache would be wrong, so every step runs the whole teacher."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from lorakit.quantize.tune import _TeacherTargets

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    teacher = Gemma2ForCausalLM(config).eval()
    blocks = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))
    targets = _TeacherTargets(teacher, blocks, batch_size=4, dtype=torch.float32, draws=100)
    assert not targets.cached
    rows = torch.tensor([5, 0])
    with torch.no_grad():
        want = torch.log_softmax(teacher(blocks[rows]).logits.float(), dim=-1)
    torch.testing.assert_close(targets.log_probs(rows), want)
