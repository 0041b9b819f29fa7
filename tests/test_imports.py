"""No import circles: the static import graph of lorakit/, tasks/, flows/ and registry/ is acyclic.

Every import counts, also those inside functions (a lazy import that dodges a circle at load time is still a
circle in the design). An edge goes to the module named: ``from a.b import c`` -> ``a.b`` (or ``a.b.c`` when
that is a module); a package's ``__init__`` re-exporting its submodules is that package's own business.
Modules that were in circles are also imported first in a fresh interpreter each.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("lorakit", "tasks", "flows", "registry")


def _modules() -> dict[str, object]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import lorakit.x.y` names a module; walk up to a known one
                    t = t.rpartition(".")[0]
                if t and t != name and not (is_pkg and t.startswith(name + ".")):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"lorakit.gate.core", "lorakit.merge.registry", "flows.release"} <= set(graph)
    assert "lorakit.merge.linear" in graph["lorakit.merge.registry"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module", ["lorakit.gate.report", "lorakit.gate.verdict", "lorakit.gate.core",
                                    "lorakit.merge.method", "lorakit.merge.linear", "lorakit.merge.task_arithmetic",
                                    "lorakit.merge.registry"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
