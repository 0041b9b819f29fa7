"""Perplexity: the fixed method against a direct computation, loading paths, exact GPTQ/AWQ dequantization."""

from __future__ import annotations

import json
import math
import os
import shutil

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's default worker count fails on 2-core machines

import pytest
import torch

from tests.conftest import assert_nothing_written, make_eval_text, make_prep_dir, run_cli
from lorakit.errors import InputError
from lorakit.evaluate import (
    dequantize_awq, dequantize_gptq, describe_model, evaluate_models, load_eval_model, perplexity, plan_windows,
    read_results,
)
from lorakit.evaluate.dequant import AWQ_ORDER

DOCS = [make_eval_text(60, seed=1), make_eval_text(90, seed=2), make_eval_text(40, seed=3)]


def _load_dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _stream(tokenizer_dir, docs):
    """The documented stream, built independently: per-document ids without specials, one EOS between."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for i, d in enumerate(docs):
        ids += ([tok.eos_token_id] if i else []) + tok.encode(d, add_special_tokens=False)
    return torch.tensor(ids)


def _hand_nll(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """HF perplexity-guide loop with full logits and log_softmax; scores targets a window has not seen scored."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_len, len(ids))
            new = end - prev_end  # targets this window is responsible for
            chunk = ids[begin:end]
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            for pos in range(max(0, len(chunk) - new), len(chunk)):
                if pos == 0:
                    continue  # no context inside the window: never scored
                total -= float(logp[pos - 1, chunk[pos]])
                count += 1
            prev_end = end
            if end == len(ids):
                break
    return total, count


# ---- windows ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 16), (100, 16, 5), (16, 16, 4), (37, 8, 1), (33, 10, 10)])
def test_windows_score_every_token_once(n, seq_len, stride):
    windows = plan_windows(n, seq_len, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    if stride < seq_len:
        assert scored == list(range(1, n))  # sliding window: every token after the first, exactly once
    else:
        assert scored == [t for t in range(1, n) if t % seq_len]  # chunks: all but each chunk's first token
    assert all(w.length <= seq_len and w.score_from > w.begin for w in windows)
    assert all(w.score_from - w.begin >= seq_len - stride for w in windows[1:] if w.length == seq_len)


def test_window_parameters_and_short_data_refused():
    with pytest.raises(InputError, match="shorter than one window"):
        plan_windows(15, 16, 16)
    with pytest.raises(InputError, match="--stride"):
        plan_windows(100, 16, 17)
    with pytest.raises(InputError, match="--seq-len"):
        plan_windows(100, 1, 1)


# ---- the method against a direct computation ---------------------------------------------------------------

@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 24)])
def test_perplexity_matches_hand_computation(tiny_base, seq_len, stride):
    ids = _stream(tiny_base, DOCS)
    nll, count = _hand_nll(_load_dense(tiny_base), ids, seq_len, stride)
    res = perplexity(tiny_base, DOCS, seq_len=seq_len, stride=stride, batch_size=3, progress=False)
    assert res.tokens == count
    assert res.nll_sum == pytest.approx(nll, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-6)
    m = res.method
    assert (m["seq_len"], m["stride"], m["tokens_total"], m["tokens_scored"]) == (seq_len, stride, len(ids), count)
    assert m["dtype"] == "float32" and res.path_used == "dense"
    assert len(m["text_digest"]) == len(m["tokenizer_digest"]) == len(m["token_digest"]) == 64
    assert res.tokens_per_s > 0


def test_batch_size_does_not_change_the_result(tiny_base):
    loaded = load_eval_model(describe_model(tiny_base), device="cpu")
    ppls = [perplexity(loaded, DOCS, seq_len=32, stride=12, batch_size=b, progress=False).ppl for b in (1, 4, 64)]
    assert max(ppls) / min(ppls) - 1 < 1e-6


def test_sources_prep_folder_jsonl_and_text_file(tiny_base, tmp_path):
    prep = make_prep_dir(tmp_path / "prep", DOCS, train_texts=["other text " * 20])
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    txt = tmp_path / "doc.txt"
    txt.write_text(DOCS[1])
    loaded = load_eval_model(describe_model(tiny_base), device="cpu")
    a, b = (perplexity(loaded, src, seq_len=32, progress=False) for src in (prep, jsonl))
    assert a.method["token_digest"] == b.method["token_digest"] and a.ppl == b.ppl
    assert a.method["source_kind"] == "prep" and a.method["split"] == "val" and a.method["n_documents"] == 3
    c = perplexity(loaded, txt, seq_len=32, progress=False)
    assert c.method["n_documents"] == 1 and c.method["tokens_total"] == len(DOCS[1].encode())
    capped = perplexity(loaded, prep, seq_len=32, max_tokens=100, progress=False)
    assert capped.method["tokens_total"] == 100 and capped.method["max_tokens"] == 100


def test_empty_and_short_data_are_clear_errors(tiny_base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(InputError, match="holds no text"):
        perplexity(tiny_base, empty, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        perplexity(tiny_base, tmp_path / "missing.txt", progress=False)
    with pytest.raises(InputError, match="not a prepared-data folder"):
        perplexity(tiny_base, tmp_path, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(InputError, match="only 16 tokens, shorter than one window of --seq-len 512"):
        perplexity(tiny_base, short, progress=False)


@pytest.fixture(scope="module")
def other_tokenizer_model(tiny_base, tmp_path_factory):
    """The tiny base with one extra special token in its tokenizer: same weights, different token stream."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("models") / "tiny-othertok"
    shutil.copytree(tiny_base, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(path)
    return path


def test_mismatched_tokenizers_refused(tiny_base, other_tokenizer_model, tmp_path):
    with pytest.raises(InputError, match="different tokenizer"):
        evaluate_models([tiny_base, other_tokenizer_model], DOCS, seq_len=32, progress=False)
    out, txt = tmp_path / "ppl.json", tmp_path / "doc.txt"
    txt.write_text("\n".join(DOCS))
    proc = run_cli("eval", str(tiny_base), str(other_tokenizer_model), "--data", str(txt), "--json", str(out))
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one actionable line, no traceback
    assert_nothing_written(out)


def test_eval_cli_writes_results_for_several_models(tiny_base, tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("\n".join(DOCS))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    out = tmp_path / "ppl.json"
    proc = run_cli("eval", str(tiny_base), str(copy), "--data", str(txt), "--seq-len", "64", "--stride", "32",
                   "--json", str(out), "-q", check=True)
    data = json.loads(out.read_text())
    assert [r.to_dict() for r in read_results(out)] == data["results"]
    a, b = data["results"]
    assert a["ppl"] == b["ppl"] and a["method"] == b["method"] == data["method"]
    assert data["method"]["stride"] == 32 and f"{a['ppl']:10.4f}" in proc.stdout
    assert data["compute_dtype"] == data["method"]["dtype"] == "float32"  # auto: float32 for evaluation, any CPU
    proc = run_cli("eval", str(tiny_base), "--data", str(txt), "--seq-len", "64", "--json", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr


# ---- adapters -----------------------------------------------------------------------------------------------

def test_adapter_is_evaluated_on_its_base(tiny_base, tmp_path):
    from peft import PeftModel

    from lorakit.models.synthetic import make_random_adapter

    adapter = make_random_adapter(tiny_base, tmp_path / "adapter", r=4, scale=0.3, seed=3)
    res = perplexity(adapter, DOCS, seq_len=64, base=tiny_base, progress=False)
    assert res.path_used == "dense+adapter" and res.model["kind"] == "adapter"
    merged = PeftModel.from_pretrained(_load_dense(tiny_base), adapter).merge_and_unload()
    nll, count = _hand_nll(merged, _stream(tiny_base, DOCS), 64, 64)
    assert res.tokens == count and res.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    base_ppl = perplexity(tiny_base, DOCS, seq_len=64, progress=False).ppl
    assert abs(res.ppl / base_ppl - 1) > 1e-4  # the adapter is really applied


# ---- exact dequantization -----------------------------------------------------------------------------------

def _pack_along(codes: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Pack integer codes into int32 words along ``dim``: slot k of word j holds element pack·j + order[k]."""
    pack = 32 // bits
    order = order or list(range(pack))
    codes = codes.movedim(dim, 0).to(torch.int64)
    words = torch.zeros((codes.shape[0] // pack, *codes.shape[1:]), dtype=torch.int64)
    for k in range(pack):
        words |= codes[order[k]::pack] << (bits * k)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_dequantization_of_hand_packed_weights(bits, checkpoint_format):
    g = torch.Generator().manual_seed(bits)
    n_in, n_out, group = 64, 32, 16
    q = torch.randint(0, 2**bits, (n_in, n_out), generator=g)
    z = torch.randint(0, 2**bits, (n_in // group, n_out), generator=g)
    z[0, :8] = 0  # zero points of 0 borrow across fields in the v1 format: the exact inverse must undo it
    s = torch.rand(n_in // group, n_out, generator=g).half()
    qzeros = _pack_along(z, bits, dim=1).to(torch.int64)
    if checkpoint_format == "gptq":  # v1 stores zero - 1, subtracted from the whole word
        offset = sum(1 << (bits * k) for k in range(32 // bits))
        qzeros = qzeros - offset
        qzeros = torch.where(qzeros < -(2**31), qzeros + 2**32, qzeros)
    w = dequantize_gptq(_pack_along(q, bits, dim=0), qzeros.to(torch.int32), s, None, bits=bits, group_size=group,
                        checkpoint_format=checkpoint_format)
    expected = ((q - z.repeat_interleave(group, 0)).float() * s.float().repeat_interleave(group, 0)).t()
    assert torch.equal(w, expected)


def test_awq_dequantization_of_hand_packed_weights():
    g = torch.Generator().manual_seed(0)
    n_in, n_out, group = 64, 48, 32
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    z = torch.randint(0, 16, (n_in // group, n_out), generator=g)
    s = torch.rand(n_in // group, n_out, generator=g).half()
    qweight = _pack_along(q, 4, dim=1, order=list(AWQ_ORDER))
    qzeros = _pack_along(z, 4, dim=1, order=list(AWQ_ORDER))
    # The layout spelled out: nibble 1 of word 0 of row 0 holds column 2 (order [0, 2, 4, 6, 1, 3, 5, 7]).
    assert (int(qweight[0, 0]) >> 4) & 0xF == int(q[0, 2])
    w = dequantize_awq(qweight, qzeros, s, group_size=group)
    expected = ((q - z.repeat_interleave(group, 0)).float() * s.float().repeat_interleave(group, 0)).t()
    assert torch.equal(w, expected)
    assert not torch.equal(dequantize_awq(_pack_along(q, 4, dim=1), qzeros, s, group_size=group), expected)


@pytest.fixture(scope="module")
def tiny_gptq(tiny_base, tmp_path_factory):
    """The tiny base quantized by GPTQModel itself (4-bit, g32, asymmetric: zero points vary)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    out = tmp_path_factory.mktemp("models") / "tiny-gptq"
    calib = [make_eval_text(80, seed=s) for s in range(16)]
    cwd = os.getcwd()
    os.chdir(out.parent)  # GPTQModel writes a ./logs/ folder into the working directory
    try:
        model = GPTQModel.load(str(tiny_base), QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=False),
                               device="cpu")
        model.quantize(calib, batch_size=1)
        model.save(str(out))
    finally:
        os.chdir(cwd)
    return out


def test_gptq_dequantized_weights_equal_gptqmodels_own(tiny_gptq):
    """GPTQModel's torch backend dequantizes each layer in fp16: ours, rounded to fp16, must be identical."""
    from gptqmodel import BACKEND, GPTQModel

    reference = GPTQModel.load(str(tiny_gptq), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    dense = load_eval_model(describe_model(tiny_gptq), quant_path="dequantized", device="cpu")
    assert dense.path_used == "gptq-dequantized"
    layers = [(n, m) for n, m in reference.model.named_modules() if hasattr(m, "dequantize_weight")]
    assert len(layers) == 14
    with torch.no_grad():
        for name, module in layers:
            theirs = module.dequantize_weight().t()  # [in, out] -> [out, in]
            ours = dense.model.get_submodule(name).weight
            assert torch.equal(theirs, ours.half()), name
            assert (theirs.float() - ours).abs().max() <= 2**-10 * ours.abs().max()  # only fp16 rounding apart


def test_gptq_dequantized_path_matches_kernel_path(tiny_gptq, tiny_base):
    kernel = perplexity(tiny_gptq, DOCS, seq_len=64, quant_path="kernel", progress=False)
    fast = perplexity(tiny_gptq, DOCS, seq_len=64, quant_path="dequantized", progress=False, kernel_check_tokens=128)
    assert (kernel.path_used, fast.path_used) == ("gptq-kernel", "gptq-dequantized")
    assert abs(fast.ppl / kernel.ppl - 1) <= 1e-3
    check = fast.extra["kernel_check"]  # the same evidence, recorded with the result on request
    assert check["agrees"] and check["tokens"] == 126 and check["kernel_path"] == "gptq-kernel"
    assert fast.method == kernel.method  # same stream, windows and dtype: comparable numbers
    dense = perplexity(tiny_base, DOCS, seq_len=64, progress=False)
    assert dense.method["tokenizer_digest"] == fast.method["tokenizer_digest"]  # quantized keeps the tokenizer
    assert fast.ppl != dense.ppl  # quantization is visible: the fast path did not load the fp32 base


@pytest.fixture(scope="module")
def tiny_awq(tiny_base, tmp_path_factory):
    """The tiny base as an AWQ GEMM checkpoint: 4-bit g32 asymmetric round-to-nearest, packed per the layout.

    (Calibrated AWQ with GPTQModel takes ~70 s on CPU; the layout, which is what the evaluator reads, is the same.)
    """
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("models") / "tiny-awq"
    shutil.copytree(tiny_base, out)
    group, tensors = 32, {}
    for name, w in load_file(tiny_base / "model.safetensors").items():
        if not name.endswith("_proj.weight"):
            tensors[name] = w
            continue
        wg = w.t().float().reshape(w.shape[1] // group, group, w.shape[0])  # [groups, group, out]
        lo, hi = wg.amin(1), wg.amax(1)
        s = ((hi - lo) / 15).clamp(min=1e-8).half()
        z = torch.round(-lo / s.float()).clamp(0, 15)
        q = (torch.round(wg / s.float()[:, None]) + z[:, None]).clamp(0, 15).reshape(w.shape[1], w.shape[0])
        prefix = name[: -len(".weight")]
        tensors[f"{prefix}.qweight"] = _pack_along(q, 4, dim=1, order=list(AWQ_ORDER))
        tensors[f"{prefix}.qzeros"] = _pack_along(z, 4, dim=1, order=list(AWQ_ORDER))
        tensors[f"{prefix}.scales"] = s
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def test_awq_dequantized_weights_equal_gptqmodels_own(tiny_awq):
    """GPTQModel's AWQ GEMM dequantizer (fp16) agrees exactly with ours rounded to fp16, on every layer."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    tensors = load_file(tiny_awq / "model.safetensors")
    dense = load_eval_model(describe_model(tiny_awq), quant_path="dequantized", device="cpu")
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    assert len(prefixes) == 14 and dense.path_used == "awq-dequantized"
    for p in prefixes:
        theirs = dequantize_gemm(tensors[f"{p}.qweight"], tensors[f"{p}.qzeros"], tensors[f"{p}.scales"], 4, 32)
        assert torch.equal(theirs.t(), dense.model.get_submodule(p).weight.half()), p


def test_awq_dequantized_path_matches_kernel_path(tiny_awq):
    kernel = perplexity(tiny_awq, DOCS, seq_len=64, quant_path="kernel", progress=False)
    fast = perplexity(tiny_awq, DOCS, seq_len=64, quant_path="dequantized", progress=False)
    assert (kernel.path_used, fast.path_used) == ("awq-kernel", "awq-dequantized")
    assert abs(fast.ppl / kernel.ppl - 1) <= 1e-3


ENGLISH = (
    "The history of the city begins with a small fishing village on the northern bank of the river. Over the "
    "centuries it grew into a busy market town, and merchants from distant regions came to trade wool, grain and "
    "salt. In the nineteenth century the railway arrived, factories were built along the water, and the population "
    "doubled within a single generation. Today the old harbour is a quiet park where families walk on weekends, and "
    "the former warehouses have become museums, cafes and small shops."
)


# lorakit scores in float32; the hand computation runs the same weights in float64. Their mean token NLLs differ
# by float32 rounding through 30 layers (eps 1.2e-7 per operation, reductions of up to 1536 terms): 2e-4 nats is
# a stated bound on it (~1700 eps at logit magnitudes ~10), an exp() away from a 2e-4 relative perplexity error.
# Differences between CPUs' float32 kernels (1.4e-5 relative was seen) sit well inside it; a scoring mistake
# (one token too many or too few, a shifted target) moves the NLL by ~1e-2 nats or more.
FP32_NLL_BOUND = 2e-4


@pytest.mark.slow
def test_real_model_perplexity_is_sane_and_matches_hand_computation(real_base):
    res = perplexity(real_base, [ENGLISH, ENGLISH.upper()], seq_len=64, stride=32, progress=False)
    nll, count = _hand_nll(_load_dense(real_base).double(), _stream(real_base, [ENGLISH, ENGLISH.upper()]), 64, 32)
    assert res.tokens == count and res.method["dtype"] == "float32"
    assert abs(math.log(res.ppl) - nll / count) <= FP32_NLL_BOUND, (math.log(res.ppl), nll / count)
    assert 2 < res.ppl < 100  # a trained model on English, not a random one (~vocab size 49152)


def test_gate_on_a_quantized_candidate_records_the_fast_path(tiny_base, tiny_gptq, tmp_path):
    from lorakit.gate import check, read_verdict

    verdict = check(tiny_base, tiny_gptq, DOCS, seq_len=64, max_degradation=0.05, output=tmp_path / "v",
                    progress=False)
    assert verdict.baseline["path_used"] == "dense" and verdict.candidate["path_used"] == "gptq-dequantized"
    assert verdict.candidate["quant"]["bits"] == 4 and verdict.candidate["quant"]["group_size"] == 32
    assert verdict.degradation != 0 and verdict.passed == (verdict.degradation <= 0.05)
    assert read_verdict(tmp_path / "v").candidate["path_used"] == "gptq-dequantized"


def test_gptq_dequantization_follows_g_idx_act_order():
    """With desc_act, input rows belong to groups in activation order: g_idx, not i // group_size, decides."""
    g = torch.Generator().manual_seed(7)
    n_in, n_out, group = 64, 16, 16
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    z = torch.randint(0, 16, (n_in // group, n_out), generator=g)
    s = torch.rand(n_in // group, n_out, generator=g).half()
    g_idx = (torch.arange(n_in) // group)[torch.randperm(n_in, generator=g)].to(torch.int32)
    w = dequantize_gptq(_pack_along(q, 4, dim=0), _pack_along(z, 4, dim=1), s, g_idx, bits=4, group_size=group,
                        checkpoint_format="gptq_v2")
    gi = g_idx.long()
    assert torch.equal(w, ((q - z[gi]).float() * s.float()[gi]).t())


def test_task_accuracy_runs_on_a_gptq_folder_via_the_dequantized_path(tiny_gptq, tiny_base, tmp_path):
    """GPTQ folders answer through the same exact dequantized model the perplexity uses on CPU."""
    from lorakit.data.prep import prepare_dataset
    from lorakit.evaluate import task_accuracies

    prep = prepare_dataset(["bundled:number-words"], tmp_path / "p", base=tiny_base, progress=False).output
    quant, dense = task_accuracies([tiny_gptq, tiny_base], prep, max_examples=6, progress=False)
    assert quant.model["path_used"] == "gptq-dequantized" and quant.n_examples == 6 and quant.split == "test"
    assert quant.model["kind"] == "gptq" and dense.model["path_used"] == "dense"
    assert all(p.prompt_tokens == q.prompt_tokens for p, q in zip(quant.predictions, dense.predictions))


def test_tokenizer_digest_follows_the_definition_not_the_object(tiny_base):
    """The digest is memoised by the serialized definition: a second load has the same digest, a token added to a
    tokenizer already digested changes it (no stale answer), and padding settings do not count."""
    from transformers import AutoTokenizer

    from lorakit.evaluate.text import tokenizer_digest

    first, second = (AutoTokenizer.from_pretrained(str(tiny_base)) for _ in range(2))
    before = tokenizer_digest(first)
    assert tokenizer_digest(second) == before
    second.padding_side = "left" if second.padding_side == "right" else "right"
    second.backend_tokenizer.enable_padding(length=7)
    assert tokenizer_digest(second) == before
    first.add_tokens(["<lorakit-new-token>"])
    assert tokenizer_digest(first) != before


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_kernel_backend_setting_picks_gptqmodels_kernel(method, tiny_gptq, tiny_awq, monkeypatch):
    """$LORAKIT_KERNEL_BACKEND=torch loads GPTQModel's plain-torch kernels (no C++ build on a fresh CUDA machine),
    and they compute what the exact dequantized path computes; an unknown name is refused naming the choices."""
    folder = {"gptq": tiny_gptq, "awq": tiny_awq}[method]
    spec = describe_model(folder)
    default = load_eval_model(spec, quant_path="kernel", device="cpu")
    monkeypatch.setenv("LORAKIT_KERNEL_BACKEND", "torch")
    chosen = load_eval_model(spec, quant_path="kernel", device="cpu")
    def kinds(loaded) -> set[str]:  # the quantized linear classes GPTQModel put in the model
        return {type(m).__name__ for m in loaded.model.modules() if hasattr(m, "qweight")}

    assert kinds(chosen) != kinds(default)  # the setting changed which kernel loaded (CPU's own pick is ATen int4)
    assert all("Torch" in k for k in kinds(chosen)), kinds(chosen)
    kernel = perplexity(chosen, DOCS, seq_len=64, progress=False)
    fast = perplexity(folder, DOCS, seq_len=64, quant_path="dequantized", progress=False)
    assert kernel.path_used == f"{method}-kernel" and abs(fast.ppl / kernel.ppl - 1) <= 1e-3
    monkeypatch.setenv("LORAKIT_KERNEL_BACKEND", "marlinn")
    with pytest.raises(InputError, match="LORAKIT_KERNEL_BACKEND must be one of auto, torch, triton"):
        load_eval_model(spec, quant_path="kernel", device="cpu")
