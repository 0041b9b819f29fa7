"""Shared-prefix training: the prompt every example of a micro-batch begins with is computed once.

Instruction and chat examples rendered through a chat template begin alike: for the bundled tasks on SmolLM2 the
default system prompt and the task's instruction are the first 33-34 tokens of every ~54-token example
(bench/results/shared_prefix.json: ``training.<task>.prefix_tokens``), and only the answer is labelled. Packed rows run that shared prompt through every layer once per example. Here a micro-batch's documents
are taken out of their packed rows, their longest common token prefix runs once (batch 1, its keys and values kept
with their autograd history), and each document's remainder runs as one row of a padded batch that attends to the
prefix through the KV cache.

This is the same computation, not an approximation: a document in a packed row attends only to itself (causal,
block-diagonal), its positions restart at 0, so its first P hidden states are a function of its first P tokens
alone and equal the shared prefix's; the gradient that reached P copies now reaches the one prefix, summed, which
is what autograd does for a tensor used B times. Float sums run in another order, so losses agree to rounding
(``tests/test_train_prefix.py`` compares loss and every LoRA gradient with the packed path). Two things would break
the equality, and each turns the path off: LoRA dropout (each copy of the prefix would draw its own mask) and
gradient checkpointing (transformers drops the KV cache under it). :func:`train_adapter` also compares the two
paths' loss on its first micro-batch and falls back to packed rows when they disagree.

The gain is the share of prompt tokens: on the bundled tasks a micro-batch of 2 packed rows of 512 tokens (~980
real) runs as one prefix plus ~18 remainders, ~440 positions in all, and its forward + backward took 2.5x less
time (bench/results/shared_prefix.json: ``training.number-words``: ``computed_tokens_median``, ``speedup``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.data.formats import IGNORE_INDEX
from lorakit.data.packing import document_ids
from lorakit.models.kv_cache import MIN_SHARED_PREFIX as MIN_PREFIX, cache_kwarg, common_prefix_len, prompt_cache


@dataclass
class PrefixBatch:
    """A micro-batch as one shared prefix plus right-padded remainders (labels aligned with their tokens)."""

    prefix_ids: torch.Tensor  # [1, P]
    suffix_ids: torch.Tensor  # [B, S]
    suffix_labels: torch.Tensor  # [B, S], IGNORE_INDEX on padding
    suffix_mask: torch.Tensor  # [B, S] 1 = real token

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.shape[1])

    @property
    def computed_tokens(self) -> int:
        """Token positions the decoder runs (prefix once, remainders with their padding)."""
        return self.prefix_len + int(self.suffix_ids.numel())


def documents(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The documents of packed rows as (tokens, labels), in row order; documents with no labelled token (the
    padding pseudo-document, or a prompt truncated before its answer) add nothing to the loss and are left out."""
    docs = []
    doc_ids = document_ids(position_ids)
    for row in range(input_ids.shape[0]):
        bounds = torch.nonzero(torch.diff(doc_ids[row], prepend=doc_ids[row, :1] - 1)).view(-1).tolist()
        bounds.append(input_ids.shape[1])
        for start, end in zip(bounds[:-1], bounds[1:]):
            lab = labels[row, start:end]
            if bool((lab != IGNORE_INDEX).any()):
                docs.append((input_ids[row, start:end], lab))
    return docs


def shared_prefix_len(docs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Length of the longest common token prefix that contains no labelled token and no position that predicts
    one (so every loss term comes from a remainder row, each counted once)."""
    if not docs:
        return 0
    n = common_prefix_len([ids.tolist() for ids, _ in docs])
    for _, lab in docs:
        labelled = torch.nonzero(lab != IGNORE_INDEX).view(-1)
        n = min(n, int(labelled[0]) - 1)  # the position before the first labelled token predicts it
    return max(0, n)


def prefix_batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, pad_id: int,
                 min_prefix: int = MIN_PREFIX) -> PrefixBatch | None:
    """The micro-batch of packed rows as a :class:`PrefixBatch`, or None where its documents share fewer than
    ``min_prefix`` leading tokens (plain text, or one document) and packed rows are the better shape."""
    docs = documents(input_ids, labels, position_ids)
    if len(docs) < 2:
        return None
    p = shared_prefix_len(docs)
    if p < min_prefix:
        return None
    width = max(int(ids.shape[0]) - p for ids, _ in docs)
    suffix_ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    suffix_labels = torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long)
    suffix_mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(docs):
        k = int(ids.shape[0]) - p
        suffix_ids[i, :k], suffix_labels[i, :k], suffix_mask[i, :k] = ids[p:], lab[p:], 1
    return PrefixBatch(docs[0][0][:p].unsqueeze(0), suffix_ids, suffix_labels, suffix_mask)


def prefix_hidden(decoder, batch: PrefixBatch, device: str) -> torch.Tensor:
    """The decoder's last hidden states of the remainders [B, S, H]: the prefix runs once with a KV cache whose
    tensors keep their autograd history, the cache is repeated to the batch, the remainders attend to it."""
    p, (b, s) = batch.prefix_len, batch.suffix_ids.shape
    cache = prompt_cache(decoder, batch.prefix_ids.to(device), b)
    mask = torch.cat([torch.ones((b, p), dtype=torch.long), batch.suffix_mask], dim=1).to(device)
    positions = (p + torch.arange(s, device=device)).unsqueeze(0).expand(b, s)
    out = decoder(input_ids=batch.suffix_ids.to(device), attention_mask=mask, position_ids=positions,
                  use_cache=True, **{cache_kwarg(decoder.forward): cache})
    return out.last_hidden_state
