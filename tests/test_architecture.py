"""The house plan, enforced: who may import whom, how big a module may grow, who may read the environment.

The rules (docs/architecture.md explains them):

- ``common/`` is the kernel: it imports nothing of the fleet.
- The orchestrator, the router, the memory manager and registration are separate processes that talk over
  HTTP: each imports ``common/`` and itself, no model code and not each other.
- The job runtime (``workers/core``) never imports a model kind, and the kinds never import each other.
- Product code never imports the stand-ins (``local/``), the benchmarks (``bench/``) or the tests.
- No file-level import cycle anywhere (``TYPE_CHECKING`` imports count: a type cycle is still a knot).
- No product module over 400 lines.
- ``os.environ`` is read only by settings/config modules and entry points.

Imports are read from the source with ``ast`` (nothing is imported), relative imports resolved.
"""
from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("common", "workers", "orchestrator", "router", "memory_manager", "registration", "wan_generate.py")
PROCESSES = ("orchestrator", "router", "memory_manager", "registration")
KINDS = ("workers/sdxl", "workers/wan", "workers/chat")
ENV_READERS = ("settings.py", "config.py", "__main__.py", "wan_generate.py")
MAX_LINES = 400


@cache
def sources() -> dict[str, Path]:
    """Module name → file, for every Python file of the repo outside tests and hidden/var folders."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "var") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = rel
    return found


def imports_of(rel: Path) -> set[str]:
    """The repo modules one file imports (``from x import y`` counts ``x.y`` when that is a module)."""
    modules = sources()
    package = list(rel.parent.parts)
    out: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text(), str(rel))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) + 1 - node.level] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            subs = {f"{module}.{alias.name}" for alias in node.names} & modules.keys()
            out |= subs or {module}
    return {owner(name) for name in out if owner(name)} - {module_of(rel)}


def owner(name: str) -> str | None:
    """The repo module that defines ``name`` (``a.b.c`` → ``a.b`` when ``a.b.c`` is an attribute)."""
    modules = sources()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def module_of(rel: Path) -> str:
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def path_of(module: str) -> str:
    return sources()[module].as_posix()


def edges() -> list[tuple[str, str]]:
    """(importing file, imported file) for every import inside the repo."""
    return sorted((rel.as_posix(), path_of(dep)) for rel in sources().values() for dep in imports_of(rel))


def within(path: str, *places: str) -> bool:
    return any(path == place or path.startswith(place.removesuffix(".py") + "/") or path == place
               for place in places)


def violations(source: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    return [f"{a} imports {b}" for a, b in edges() if within(a, *source) and not within(b, *allowed)]


def test_the_kernel_imports_nothing_of_the_fleet() -> None:
    assert violations(("common",), ("common",)) == []


def test_each_supervising_process_imports_only_the_kernel_and_itself() -> None:
    for process in PROCESSES:
        assert violations((process,), ("common", process)) == [], process


def test_the_job_runtime_knows_no_model_kind_and_the_kinds_not_each_other() -> None:
    assert violations(("workers/core",), ("common", "workers/core")) == []
    for kind in KINDS:
        others = tuple(k for k in KINDS if k != kind)
        assert [f"{a} imports {b}" for a, b in edges() if within(a, kind) and within(b, *others)] == [], kind


def test_the_product_never_imports_stand_ins_benchmarks_or_tests() -> None:
    assert [f"{a} imports {b}" for a, b in edges() if within(a, *PRODUCT) and within(b, "local", "bench")] == []
    for rel in sources().values():
        if within(rel.as_posix(), *PRODUCT):
            tree = ast.parse((ROOT / rel).read_text())
            named = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            named |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            assert not {m for m in named if m.split(".")[0] == "tests"}, rel


def test_no_import_cycle_between_files() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)
    assert strongly_connected(graph) == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one file (each one an import cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_product_module_is_over_400_lines() -> None:
    sizes = {rel.as_posix(): len((ROOT / rel).read_text().splitlines()) for rel in sources().values()
             if within(rel.as_posix(), *PRODUCT)}
    assert {path: lines for path, lines in sizes.items() if lines > MAX_LINES} == {}


def test_only_settings_modules_and_entry_points_read_the_environment() -> None:
    readers = []
    for rel in sources().values():
        if not within(rel.as_posix(), *PRODUCT) or rel.name in ENV_READERS:
            continue
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{rel.as_posix()}:{node.lineno}")
    assert readers == []


def test_the_import_reader_sees_relative_and_absolute_imports() -> None:
    assert "common.declare" in imports_of(Path("common/topology.py"))
    assert "router.app" in imports_of(Path("router/__main__.py"))
