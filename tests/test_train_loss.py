"""The training loss over labelled positions only (chunked output head) equals the full-logits cross-entropy, and
so do its LoRA gradients, both checked against a float64 computation of the plain full-logits loss."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lorakit.data.formats import IGNORE_INDEX
from lorakit.data.prep import prepare_dataset
from lorakit.models.synthetic import lora_grad_vector, randomize_lora_b
from lorakit.train import loop
from lorakit.train.batches import load_rows, model_inputs
from lorakit.train.model import load_for_training

# float32 carries 24 bits (eps 1.2e-7). The loss is a sum of a few hundred per-token terms, each from softmax
# sums over the vocabulary and matmuls of depth <= 256 through 2 layers; a relative error of 2e-5 is about
# 170 eps, loose enough for any kernel's summation order and tight enough to catch one token counted wrong
# (that changes the sum by ~1/n_tokens, >= 1e-3 here). Gradients: same bound on their relative L2 error.
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def prep(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loss") / "prep"
    prepare_dataset(["bundled:reverse-words"], out, base=tiny_base, max_length=128, progress=False)
    return out


def _full_logits_loss(model, batch, labels) -> torch.Tensor:
    """The plain computation: logits for every position, cross-entropy with ignore_index."""
    logits = model(**batch, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [loop.LOSS_CHUNK, 7])
def test_labelled_loss_matches_full_logits_in_float64(tiny_base, prep, monkeypatch, chunk):
    kw = dict(quant="none", device="cpu", r=4, alpha=8, dropout=0.0, targets="all-linear", rslora=False, seed=0,
              gradient_checkpointing=False, compute_dtype="float32")
    model = load_for_training(tiny_base, **kw).model
    randomize_lora_b(model, scale=0.05)  # B = 0 at init would make every A gradient vanish
    model.train()
    ref = copy.deepcopy(model).double()
    rows = load_rows(prep, "train")
    idx = torch.arange(min(4, len(rows)))
    labels = rows.labels[idx]
    n_labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert 0 < n_labelled < labels[:, 1:].numel()  # instruction rows: some positions are not labelled
    if chunk == 7:
        assert n_labelled > 7  # several chunks
    monkeypatch.setattr(loop, "LOSS_CHUNK", chunk)

    loss = loop._batch_loss_sum(model, rows, idx, "cpu")
    loss.backward()
    loss64 = _full_logits_loss(ref, model_inputs(rows, idx, "cpu"), labels)
    loss64.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - loss64.item()) <= REL_TOL * abs(loss64.item())
    g, g64 = lora_grad_vector(model), lora_grad_vector(ref)
    assert g.shape == g64.shape and g64.norm() > 0
    assert (g - g64).norm() <= REL_TOL * g64.norm()

    # No gradient: the same sum (the gate's after-training check runs under no_grad).
    with torch.no_grad():
        again = loop._batch_loss_sum(model, rows, idx, "cpu")
    assert abs(again.item() - loss64.item()) <= REL_TOL * abs(loss64.item())
