"""The training sanity gate: a run that cannot have learned anything fails loudly instead of writing an adapter.

Checked at every step: the loss is finite; the LoRA gradient norm is finite and not zero. Checked at the end: the
loss on the FIRST training batch, recomputed after training with dropout off, is lower than it was before the
first update by at least ``min_loss_drop`` (relative). Using the same batch removes batch-to-batch noise, so a
run with lr=0 (weights unchanged: exactly the same loss) fails deterministically and a learning run passes.
"""

from __future__ import annotations

import math

from lorakit.errors import EXIT_REJECTED, LorakitError


class TrainingSanityError(LorakitError):
    """The run failed the sanity gate; nothing was written."""

    exit_code = EXIT_REJECTED


def check_step(step: int, loss: float, grad_norm: float) -> None:
    if not math.isfinite(loss):
        raise TrainingSanityError(
            f"training loss became {loss} at step {step}; the run diverged or a batch holds NaN/Inf values. Lower --lr, "
            "check the data and the base model's weights, then run again (nothing was written)"
        )
    if not math.isfinite(grad_norm):
        raise TrainingSanityError(
            f"LoRA gradient norm is {grad_norm} at step {step}; lower --lr or check the data (nothing was written)"
        )
    if grad_norm == 0.0:
        raise TrainingSanityError(
            f"LoRA gradient norm is exactly 0 at step {step}: the adapter is not connected to the loss (no trainable "
            "target? all labels masked?). Check --target and the prepared data (nothing was written)"
        )


def check_loss_fell(before: float, after: float, min_drop: float | None) -> float:
    """Relative drop of the first batch's loss; raises when it is below ``min_drop`` (None disables the check)."""
    drop = (before - after) / abs(before) if before else 0.0
    if min_drop is not None and not drop > min_drop:
        raise TrainingSanityError(
            f"training loss did not fall: first batch {before:.6f} before training, {after:.6f} after "
            f"(relative drop {drop:.4%}, required > {min_drop:.2%}). Raise --lr or train longer; if this is expected, "
            "pass --min-loss-drop with a lower value (nothing was written)"
        )
    return drop
