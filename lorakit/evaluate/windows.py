"""Cutting the token stream into scored windows: which tokens each forward pass sees and which it scores.

Window ``k`` feeds tokens ``[begin, end)`` with ``begin = k·stride`` and ``end = min(begin + seq_len, n)``, and
stops at the first window that reaches the end of the stream. It scores the targets ``t`` in
``[max(previous end, begin + 1), end)``, each predicted from the tokens ``[begin, t)``:

* ``stride == seq_len``: non-overlapping chunks; every chunk scores all its tokens but its first (which has no
  context inside the chunk), as in the Hugging Face perplexity guide.
* ``stride < seq_len``: a sliding window; each window scores only the ``stride`` new tokens, each with at least
  ``seq_len - stride`` tokens of context, and every token from position 1 on is scored exactly once.

Perplexity is ``exp(Σ NLL / number of scored tokens)``: a token-level mean, never a mean of window means.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import InputError


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    score_from: int  # first scored target position (absolute)

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def check_window_params(seq_len: int, stride: int) -> None:
    if int(seq_len) < 2:
        raise InputError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if not 1 <= int(stride) <= int(seq_len):
        raise InputError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")


def plan_windows(n_tokens: int, seq_len: int, stride: int, *, source: str = "evaluation data") -> list[Window]:
    """The windows for a stream of ``n_tokens`` tokens; refuses data shorter than one full window."""
    check_window_params(seq_len, stride)
    if n_tokens < seq_len:
        raise InputError(
            f"{source} has only {n_tokens} tokens, shorter than one window of --seq-len {seq_len}; "
            "pass more text or a smaller --seq-len"
        )
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows with the same shape (length and scored count) grouped into batches.

    Grouping by shape keeps every forward pass unpadded, so the numbers do not depend on padding or masks.
    """
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size}")
    out: list[list[Window]] = []
    for w in windows:
        last = out[-1] if out else None
        if last and len(last) < batch_size and (last[0].length, last[0].n_scored) == (w.length, w.n_scored):
            last.append(w)
        else:
            out.append([w])
    return out
