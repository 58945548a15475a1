"""The shape of the package: a pure core that imports no edge, no import cycles, modules one can read.

Read from the source with `ast`, so a late import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "falcoria_worker"

# Pure: no subprocess, no sockets, no clock, no environment (docs/design.md, "Layers").
CORE = frozenset(
    {
        "errors",
        "model",
        "policy",
        "scope",
        "argv",
        "merge",
        "config",
        "setting_checks",
        "settings_doc",
        "keys",
        "protocol",
        "lifecycle",
    }
)
# The modules that carry the run loop: each small enough to hold one reason to change.
LOOP = frozenset({"runloop", "connection", "admission", "scanning", "tasks", "control", "leases", "identity"})
MAX_LINES, MAX_LOOP_LINES = 550, 350


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("falcoria_worker"):
                parts = node.module.split(".")
                deps |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("falcoria_worker.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_the_core_imports_no_edge() -> None:
    graph = _imports()
    assert set(graph) >= CORE, sorted(CORE - set(graph))
    leaks = {module: sorted(graph[module] - CORE) for module in CORE if graph[module] - CORE}
    assert leaks == {}


def test_no_import_cycles() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path[path.index(module) :], module])
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            if dep in graph:
                visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_modules_stay_small_enough_to_read() -> None:
    sizes = {path.stem: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
    assert set(sizes) >= LOOP
    assert {m: sizes[m] for m in LOOP if sizes[m] > MAX_LOOP_LINES} == {}
