"""Packages that import light: their public names load the submodule that defines them on first use.

A run config or a ``--help`` reads a package's light modules (its options) without paying for torch; the names
that need the heavy modules resolve through :func:`lazy_exports`'s ``__getattr__`` (PEP 562).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``: ``modules`` maps each submodule to the names it defines."""
    module_of = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return sorted(module_of), __getattr__
