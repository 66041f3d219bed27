"""ib_edge.runtime's layering, read from its source (AST, nothing imported): no module imports
ib_edge.export, ib_edge.quant or ib_edge.bench, and the runtime's own modules import each other
without a cycle, counting imports inside functions too (a lazy import does not break a circle)."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

FORBIDDEN = ("ib_edge.export", "ib_edge.quant", "ib_edge.bench")
PACKAGE = "ib_edge.runtime"


def runtime_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    return Path(next(iter(spec.submodule_search_locations)))


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file; ``from P import
    name`` counts as importing ``P.name`` where that is one of ``modules``, else ``P``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            out.update(subs if subs else {base})
    return out


def runtime_graph() -> dict[str, set[str]]:
    """runtime module -> the runtime modules and the forbidden ones it imports."""
    root = runtime_dir()
    files = {(PACKAGE if p.name == "__init__.py" else f"{PACKAGE}.{p.stem}"): p for p in sorted(root.glob("*.py"))}
    graph = {}
    for m, p in files.items():
        deps = imports_of(p, m, set(files))
        graph[m] = {i for i in deps if (i in files and i != m) or i.startswith(FORBIDDEN)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_runtime_imports_no_export_quant_bench():
    graph = runtime_graph()
    assert f"{PACKAGE}.llm" in graph and f"{PACKAGE}.decode" in graph  # the walk read the package
    bad = sorted(f"{m} imports {i}" for m, deps in graph.items() for i in deps if i.startswith(FORBIDDEN))
    assert not bad, bad


def test_runtime_modules_import_without_cycle():
    graph = runtime_graph()
    assert f"{PACKAGE}.decode" in graph[f"{PACKAGE}.llama"]  # imports were resolved to module names
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
