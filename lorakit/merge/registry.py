"""The merge methods lorakit knows, in one static list: name, parameters, and the function on deltas.

The CLI's ``--method`` choices, parameter validation and the metadata written with each output all come from
these declarations, so adding a method is its function and declaration in a method module plus one entry here.
The method modules never import this one (mergekit's layout), so there is no import circle.
"""

from __future__ import annotations

import math
from typing import Any

from lorakit.errors import InputError
from lorakit.merge.linear import LINEAR
from lorakit.merge.options import METHOD_NAMES
from lorakit.merge.method import MergeMethod, ModuleContext, Param  # noqa: F401  (re-exported)
from lorakit.merge.regmean import REGMEAN
from lorakit.merge.task_arithmetic import DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE, TIES

METHODS: dict[str, MergeMethod] = {m.name: m for m in (LINEAR, TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE, REGMEAN)}
# The run config and the CLI read the names from the light options module; they must be exactly these.
assert tuple(METHODS) == METHOD_NAMES, "lorakit.merge.options.METHOD_NAMES must list the registry's methods in order"


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown merge method {name!r}; choose one of: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    return list(METHODS)


def methods_using(param: str) -> str:
    return ", ".join(m.name for m in METHODS.values() if any(p.name == param for p in m.params)) or "no method"


def resolve_params(method: MergeMethod, given: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, check required values and ranges; parameters the method does not take are refused."""
    out: dict[str, Any] = {}
    for p in method.params:
        value = given.get(p.name)
        if value is None:
            if p.required:
                raise InputError(f"method {method.name} needs --{p.name} ({p.help})")
            value = p.default
        out[p.name] = value
    extra = sorted(k for k, v in given.items() if v not in (None, False) and k not in out)
    if extra:
        raise InputError(f"method {method.name} takes no --{extra[0]}; it applies to: {methods_using(extra[0])}")
    density = out.get("density")
    if density is not None and not (0.0 < float(density) <= 1.0 and math.isfinite(float(density))):
        raise InputError(f"--density must be in (0, 1], got {density}")
    return out
