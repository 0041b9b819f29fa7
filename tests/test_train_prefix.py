"""Shared-prefix training (lorakit.train.prefix) computes what packed rows compute: the documents it cuts out of
packed rows, the prefix it shares, its loss and LoRA gradients against a float64 full-logits reference, and a
whole training run against the same run on packed rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.data.formats import IGNORE_INDEX as X
from lorakit.data.prep import prepare_dataset
from lorakit.models.synthetic import lora_grad_vector, randomize_lora_b
from lorakit.train import loop, train_adapter
from lorakit.train.batches import load_rows, model_inputs
from lorakit.train.model import load_for_training
from lorakit.train.prefix import documents, prefix_batch, shared_prefix_len

# As tests/test_train_loss.py: ~170 float32 eps over a sum of a few hundred token terms; one token counted twice or
# dropped moves the sum by >= 1e-3.
REL_TOL = 2e-5


def test_documents_leave_out_the_padding_and_unlabelled_documents():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 9, 0, 0], [5, 6, 1, 2, 3, 0, 0, 0, 0]])
    lab = torch.tensor([[X, X, 7, 8, X, X, 9, X, X], [X, X, X, X, X, X, X, X, X]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2, 3]])
    docs = documents(ids, lab, pos)
    assert [d[0].tolist() for d in docs] == [[5, 6, 7, 8], [5, 6, 9]]
    assert [d[1].tolist() for d in docs] == [[X, X, 7, 8], [X, X, 9]]


def test_the_prefix_stops_where_documents_differ_and_before_the_first_prediction():
    a = (torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([X, X, X, X, 5, 6]))
    b = (torch.tensor([1, 2, 3, 9, 5, 6]), torch.tensor([X, X, X, X, X, 6]))
    assert shared_prefix_len([a, b]) == 3  # token 3 differs
    c = (torch.tensor([1, 2, 3, 4, 5, 7]), torch.tensor([X, X, X, 4, 5, 7]))
    assert shared_prefix_len([a, c]) == 2  # position 2 predicts c's first labelled token
    assert shared_prefix_len([a, a]) == 3
    assert prefix_batch(torch.tensor([[1, 2, 3, 4, 5, 6]]), a[1].unsqueeze(0), torch.arange(6).unsqueeze(0), 0) is None


@pytest.fixture(scope="module")
def prep(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefix") / "prep"
    prepare_dataset(["bundled:number-words"], out, base=tiny_base, max_length=256, progress=False)
    return out


def _model(tiny_base, quant="none", dtype="float32"):
    model = load_for_training(tiny_base, quant=quant, device="cpu", r=4, alpha=8, dropout=0.0, targets="all-linear",
                              rslora=False, seed=0, gradient_checkpointing=False, compute_dtype=dtype).model
    randomize_lora_b(model, scale=0.05)  # B = 0 at init would make every A gradient vanish
    model.train()
    return model


def test_shared_prefix_loss_and_gradients_match_a_float64_full_logits_reference(tiny_base, prep):
    model = _model(tiny_base)
    ref = copy.deepcopy(model).double()
    rows = load_rows(prep, "train")
    idx = torch.arange(min(2, len(rows)))
    batch = prefix_batch(rows.input_ids[idx], rows.labels[idx], rows.position_ids[idx], pad_id=0)
    assert batch is not None and batch.prefix_len >= 20  # chat template + instruction
    assert batch.suffix_ids.shape[0] >= 4 and batch.computed_tokens < rows.input_ids[idx].numel()

    stats: dict[str, int] = {}
    loss = loop._batch_loss_sum(model, rows, idx, "cpu", shared_prefix=True, stats=stats)
    loss.backward()
    assert stats["computed_tokens"] == batch.computed_tokens

    logits = ref(**model_inputs(rows, idx, "cpu"), use_cache=False).logits[:, :-1]  # packed rows, no sharing
    labels = rows.labels[idx][:, 1:]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=X, reduction="sum")
    want.backward()
    assert abs(float(loss) - float(want)) <= REL_TOL * abs(float(want))
    got, ref_grads = lora_grad_vector(model), lora_grad_vector(ref)
    assert float((got - ref_grads).norm() / ref_grads.norm()) <= REL_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_prefix_matches_packed_rows_on_an_nf4_base(tiny_base, prep, dtype):
    model = _model(tiny_base, quant="nf4", dtype=dtype)
    rows = load_rows(prep, "train")
    idx = torch.arange(min(2, len(rows)))
    check = loop._check_shared_prefix(model, rows, idx, "cpu", dtype)
    assert check["used"], check
    assert check["check_rel_diff"] <= loop.PREFIX_CHECK_RTOL[dtype]


TRAIN = dict(quant="none", r=4, alpha=8, lr=0.01, max_steps=3, batch_size=1, grad_accum=2, progress=False,
             checkpoint_every=None, min_loss_drop=None, compute_dtype="float32")


def test_a_run_on_shared_prefixes_trains_the_adapter_the_packed_run_trains(tiny_base, prep, tmp_path):
    """Gradient checkpointing turns sharing off (and changes nothing else), so the two runs differ only in path."""
    shared = train_adapter(prep, tmp_path / "shared", base=tiny_base, dropout=0.0, **TRAIN)
    packed = train_adapter(prep, tmp_path / "packed", base=tiny_base, dropout=0.0, gradient_checkpointing=True, **TRAIN)
    rec_s, rec_p = shared.metadata, packed.metadata
    assert rec_s["shared_prefix"]["used"] and not rec_p["shared_prefix"]["used"]
    assert "checkpointing" in rec_p["shared_prefix"]["reason"]
    assert rec_s["tokens"] == rec_p["tokens"] and rec_s["computed_tokens"] < rec_p["computed_tokens"]
    assert abs(rec_s["final_loss"] - rec_p["final_loss"]) <= 1e-4 * rec_p["final_loss"]
    a = load_file(str(tmp_path / "shared" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-6), key
    log = [json.loads(line) for line in (tmp_path / "shared" / loop.TRAIN_LOG).read_text().splitlines()]
    assert all(e["computed_tokens"] < e["tokens"] for e in log)


def test_dropout_and_plain_text_keep_packed_rows_and_say_why(tiny_base, prep, tmp_path):
    with_dropout = train_adapter(prep, tmp_path / "dropout", base=tiny_base, dropout=0.1, **dict(TRAIN, max_steps=1))
    assert with_dropout.metadata["shared_prefix"] == {
        "used": False, "reason": "LoRA dropout 0.1 draws its own mask for every copy of the prompt"}
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} talks about rivers and stones." for i in range(40)))
    text_prep = prepare_dataset([text], tmp_path / "text-prep", base=tiny_base, max_length=64, progress=False).output
    plain = train_adapter(text_prep, tmp_path / "text-adapter", base=tiny_base, dropout=0.0, **dict(TRAIN, max_steps=1))
    assert not plain.metadata["shared_prefix"]["used"]
    assert "leading prompt tokens" in plain.metadata["shared_prefix"]["reason"]
