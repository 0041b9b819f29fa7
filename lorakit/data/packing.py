"""Turn tokenized examples into fixed-length training rows: packed (several documents a row) or padded.

Packed rows carry per-document ``position_ids`` that restart at 0 for every document and NO attention mask.
transformers (>= 4.47, verified on 5.24 with sdpa and eager on CPU, and flash-attention on CUDA) turns such
position ids into a block-diagonal causal mask when ``attention_mask`` is None and no KV cache is used, so a
token never attends to another document: ``tests/test_data_packing.py`` proves it by comparing the logits of a
packed document with those of the same document run alone. :func:`block_diagonal_mask` builds the same mask
explicitly (4D, boolean) for code paths that need it.

Padded rows hold one example each, right-padded to the longest example of the split, with a 2D attention mask.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from lorakit.data.formats import IGNORE_INDEX, Tokenized


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    attention_mask: list[int] | None  # None for packed rows (documents are told apart by position_ids)
    n_documents: int
    n_tokens: int  # real tokens (the rest is padding)


def pack_rows(examples: list[Tokenized], row_length: int, pad_id: int) -> list[Row]:
    """Best-fit-decreasing bin packing of whole examples into rows of ``row_length`` tokens.

    Examples are never split across rows (a split document would lose its context), so an example longer than a
    row must already have been truncated or dropped. The tail of a row is padding with labels -100, forming its
    own pseudo-document whose positions restart at 0 so it cannot touch the real documents before it.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for i in order:
        n = len(examples[i].input_ids)
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, r = free.pop(k)
        else:
            cap, r = row_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if cap - n > 0:
            bisect.insort(free, (cap - n, r))
    out = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in sorted(members):  # original order inside a row: deterministic and readable
            ex = examples[i]
            ids += ex.input_ids
            labels += ex.labels
            pos += list(range(len(ex.input_ids)))
        pad = row_length - len(ids)
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pad))
        out.append(Row(ids, labels, pos, None, len(members), row_length - pad))
    return out


def pad_rows(examples: list[Tokenized], row_length: int, pad_id: int) -> list[Row]:
    """One example a row, right-padded to ``row_length`` with a 2D attention mask."""
    out = []
    for ex in examples:
        n = len(ex.input_ids)
        if n == 0:
            continue
        pad = row_length - n
        out.append(Row(ex.input_ids + [pad_id] * pad, ex.labels + [IGNORE_INDEX] * pad,
                       list(range(n)) + [0] * pad, [1] * n + [0] * pad, 1, n))
    return out


def document_ids(position_ids):
    """Per-token document index of packed rows: a new document starts wherever the position does not advance by 1."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).long()
    return starts.cumsum(-1)


def block_diagonal_mask(position_ids):
    """[batch, 1, seq, seq] boolean mask: causal and within one document (True = may attend)."""
    import torch

    docs = document_ids(position_ids)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    same = docs[:, :, None] == docs[:, None, :]
    return (same & causal)[:, None]
