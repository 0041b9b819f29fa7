"""The KV-cache plumbing two places share: training on a shared prompt (``lorakit.train.prefix``) and greedy
generation from one (``lorakit.evaluate.accuracy.generate_greedy``): run a prompt once, repeat its cache to a batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

MIN_SHARED_PREFIX = 8  # below this the saving does not pay for the extra forward call


def cache_kwarg(fn) -> str:
    """The keyword that passes a KV cache to ``fn`` (a decoder's forward, or ``generate``): transformers 5.x renamed
    ``past_key_values`` to ``cache`` (the old name warns until it is removed)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def generate_cache_kwarg() -> str:
    """The keyword ``generate`` takes a prepared KV cache by (it reads it from ``**kwargs``, so no signature says)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every sequence starts with."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def prompt_cache(forward, prefix_ids: torch.Tensor, batch: int):
    """The KV cache of ``prefix_ids`` [1, P] (positions 0..P-1) from ``forward`` (a model or decoder called with
    ``use_cache=True``), repeated to ``batch`` rows. Under grad the cache keeps its autograd history."""
    positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device).unsqueeze(0)
    out = forward(input_ids=prefix_ids, position_ids=positions, use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values  # transformers 5.x renamed the field
    cache.batch_repeat_interleave(batch)
    return cache
