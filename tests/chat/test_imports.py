"""The generation core of the chat worker imports downward only: the engine uses the two batch strategies, they
use the request types (generation.py) and the lower kits, and nothing of it imports the engine back or the
HTTP/handler layer above it. Imports under ``TYPE_CHECKING`` and inside functions count too: a cycle hidden
from the interpreter is still one a reader has to untangle."""
from __future__ import annotations

import ast
from pathlib import Path

import workers.chat

PACKAGE = "workers.chat"
FOLDER = Path(workers.chat.__file__).parent
ABOVE_THE_ENGINE = {"api", "handler", "openai", "service", "client"}


def imported_siblings(module: str) -> set[str]:
    """The ``workers.chat`` modules that ``module`` imports anywhere in its source (relative or absolute)."""
    tree = ast.parse((FOLDER / f"{module}.py").read_text(), filename=f"{module}.py")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1:   # above the package: not a sibling
                continue
            target = (PACKAGE + (f".{node.module}" if node.module else "")) if node.level else (node.module or "")
            if target == PACKAGE:
                names.update(alias.name for alias in node.names)
            elif target.startswith(PACKAGE + "."):
                names.add(target[len(PACKAGE) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name[len(PACKAGE) + 1:].split(".")[0] for alias in node.names
                         if alias.name.startswith(PACKAGE + "."))
    return {name for name in names if (FOLDER / f"{name}.py").is_file() and name != module}


def graph_below(root: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    todo = [root]
    while todo:
        module = todo.pop()
        if module not in graph:
            graph[module] = imported_siblings(module)
            todo.extend(graph[module])
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_reader_sees_typing_only_and_function_local_imports():
    assert imported_siblings("engine") >= {"batch", "slot_batch", "generation", "models"}
    assert imported_siblings("slot_batch") >= {"batch", "generation", "graphs"}


def test_the_generation_core_has_no_import_cycle():
    graph = graph_below("engine")
    assert {"batch", "slot_batch", "generation", "graphs"} <= set(graph)
    assert a_cycle(graph) is None, " -> ".join(a_cycle(graph) or [])


def test_nothing_below_the_engine_imports_it_or_the_layers_above():
    graph = graph_below("engine")
    for module, targets in graph.items():
        assert "engine" not in targets, f"{module} imports the engine"
        assert not targets & ABOVE_THE_ENGINE, f"{module} imports {sorted(targets & ABOVE_THE_ENGINE)}"


def test_the_cycle_finder_finds_a_cycle():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b"}, "b": set()}) is None
