"""The merge methods lorakit knows, each declared once: name, parameters, and the function on deltas.

The CLI's ``--method`` choices, parameter validation and the metadata written with each output all come from
these declarations, so adding a method is one entry here plus its function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import InputError


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

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults, check required values and ranges; unknown parameters for this method are refused."""
        out: dict[str, Any] = {}
        for p in self.params:
            value = given.get(p.name)
            if value is None:
                if p.required:
                    raise InputError(f"method {self.name} needs --{p.name} ({p.help})")
                value = p.default
            out[p.name] = value
        extra = sorted(k for k, v in given.items() if v not in (None, False) and k not in out)
        if extra:
            raise InputError(f"method {self.name} takes no --{extra[0]}; it applies to: {methods_using(extra[0])}")
        density = out.get("density")
        if density is not None and not (0.0 < float(density) <= 1.0 and math.isfinite(float(density))):
            raise InputError(f"--density must be in (0, 1], got {density}")
        return out


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise InputError(f"unknown merge method {name!r}; choose one of: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    _load_builtin()
    return list(_METHODS)


def methods_using(param: str) -> str:
    _load_builtin()
    return ", ".join(m.name for m in _METHODS.values() if any(p.name == param for p in m.params)) or "no method"


def _load_builtin() -> None:
    # Importing the method modules registers them; kept lazy so registry.py has no import cycle.
    from lorakit.merge import linear, task_arithmetic  # noqa: F401
