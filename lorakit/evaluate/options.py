"""The perplexity method's window options, declared once (:mod:`lorakit.options`): ``lorakit eval`` and
``lorakit gate`` build ``--seq-len``/``--stride``/``--max-tokens`` from :class:`WindowOptions`, the run config's
``gate:`` section extends it, and :mod:`lorakit.evaluate.core` takes its defaults from it."""

from __future__ import annotations

from pydantic import Field

from lorakit.options import StageOptions


class WindowOptions(StageOptions):
    """How a token stream is cut into scored windows (strided-window token-mean NLL)."""

    seq_len: int = Field(512, gt=0, description="Tokens per window.")
    stride: int | None = Field(None, gt=0, description="Tokens between window starts; none = seq_len "
                               "(non-overlapping). With stride < seq_len each window scores only its new tokens.")
    max_tokens: int | None = Field(None, gt=0, description="Cut each token stream to its first N tokens; none = all.")


WINDOW = WindowOptions()
