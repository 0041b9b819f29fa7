"""What a merge method is: its name, its parameters (declared once) and its function on the deltas.

The method modules (linear.py, task_arithmetic.py) build these; registry.py lists them. Nothing here imports
either, so the dependency runs one way: method <- method modules <- registry <- core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Param:
    """One method parameter as the user sets it (``--density``, ``--seed``, ``--normalize``)."""

    name: str
    kind: type
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class ModuleContext:
    """What a method may know about the module it merges: enough to derive per-adapter random streams.

    ``adapters`` holds each input adapter's content digest (the one recorded in lorakit_merge.json), in the
    order of the deltas, so a stream can follow the adapter rather than its position in the list.
    """

    name: str
    seed: int
    adapters: tuple[str, ...] = ()


DeltaCombiner = Callable[[Sequence[torch.Tensor], Sequence[float], ModuleContext, dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    combine: DeltaCombiner
    params: tuple[Param, ...] = ()
    # A factor-space merge is exactly a low-rank adapter (concatenated factors) without any SVD.
    factorable: bool = False
