"""Packed rows never let a token attend to another document: proved with real model forwards.

The logits of each document inside a packed row (per-document position_ids, no attention mask, as training
feeds them) must equal the logits of that document run alone, for the sdpa and eager attention kernels. A control
with running positions (what packing without boundaries would do) must differ, so the test can fail.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.data.packing import block_diagonal_mask, document_ids
from lorakit.data.prep import prepare_dataset
from lorakit.train.batches import load_rows, model_inputs


@pytest.fixture(scope="module")
def packed_prep(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("packing") / "prep"
    prepare_dataset(["bundled:reverse-words"], out, base=tiny_base, max_length=512, progress=False)
    return out


def _model(tiny_base, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attn).eval()


def _docs(position_ids: torch.Tensor, n_tokens: int) -> list[tuple[int, int]]:
    ids = document_ids(position_ids[None])[0]
    spans = []
    for d in ids[:n_tokens].unique().tolist():
        where = (ids == d).nonzero().view(-1)
        spans.append((int(where[0]), int(where[-1]) + 1))
    return spans


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_see_only_themselves(tiny_base, packed_prep, attn):
    model = _model(tiny_base, attn)
    rows = load_rows(packed_prep, "train")
    assert rows.attention_mask is None
    row = 0
    spans = _docs(rows.position_ids[row], int(rows.tokens[row]))
    assert len(spans) >= 3, "the fixture should pack several documents into a row"
    with torch.no_grad():
        packed = model(**model_inputs(rows, torch.tensor([row]), "cpu"), use_cache=False).logits[0]
        running = model(input_ids=rows.input_ids[row:row + 1], use_cache=False).logits[0]
        worst, control = 0.0, 0.0
        for start, end in spans:
            alone = model(input_ids=rows.input_ids[row:row + 1, start:end], use_cache=False).logits[0]
            worst = max(worst, (packed[start:end] - alone).abs().max().item())
            control = max(control, (running[start:end] - alone).abs().max().item())
    assert worst < 1e-4, f"{attn}: a packed document's logits differ from the document alone by {worst}"
    assert control > 1e-2, "control: without document boundaries the logits should differ (test would be blind)"


def test_explicit_block_diagonal_mask_matches(tiny_base, packed_prep):
    """The explicit 4D mask (for code paths that need one) gives the same logits as the implicit packed mask."""
    model = _model(tiny_base, "sdpa")
    rows = load_rows(packed_prep, "train")
    pos = rows.position_ids[:2]
    with torch.no_grad():
        implicit = model(input_ids=rows.input_ids[:2], position_ids=pos, use_cache=False).logits
        explicit = model(input_ids=rows.input_ids[:2], position_ids=pos, attention_mask=block_diagonal_mask(pos),
                         use_cache=False).logits
    assert (implicit - explicit).abs().max().item() < 1e-4


def test_padded_rows_match_unpadded(tiny_base, tmp_path):
    out = tmp_path / "prep"
    prepare_dataset(["bundled:number-words"], out, base=tiny_base, max_length=512, pack=False, progress=False)
    rows = load_rows(out, "train")
    assert rows.attention_mask is not None
    model = _model(tiny_base, "sdpa")
    idx = torch.argsort(rows.tokens)[:1]  # the shortest example: the most padding
    n = int(rows.tokens[idx])
    assert n < rows.input_ids.shape[1]
    with torch.no_grad():
        padded = model(**model_inputs(rows, idx, "cpu"), use_cache=False).logits[0, :n]
        alone = model(input_ids=rows.input_ids[idx, :n], use_cache=False).logits[0]
    assert (padded - alone).abs().max().item() < 1e-4
