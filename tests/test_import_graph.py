"""The project's modules import each other without a circle: every package (the parity suite,
the benchmarks and the tests included), every import statement, also those inside functions.
Read with ``ast``, nothing imported. Run: ``python -m pytest tests/test_import_graph.py -q``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tl_common", "tl_keras", "tl_torch", "parity_tests", "benchmarks", "tests")


def module_names() -> dict[str, Path]:
    names = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            names[name] = path
    return names


def imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project's modules an AST imports: ``import a.b``, ``from a.b import c`` (a.b.c where c
    is a module, else a.b); the package's own ``__init__`` is an edge only when named."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & set(modules)


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(ast.parse(path.read_text()), modules) - {name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_are_found():
    """The finder itself: a circle through a function-level import is one."""
    tree = ast.parse("import a\ndef f():\n    from b import x\n")
    modules = {"a": Path("a.py"), "b": Path("b.py"), "b.x": Path("b/x.py")}
    assert imported(tree, modules) == {"a", "b.x"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 80 and graph["tl_torch.convert"]  # the project was read
    assert cycles(graph) == []


def test_suite_and_readers_stay_apart():
    """The parity suite does not import the benchmark harness; predict and convert do not
    import the trainer."""
    graph = import_graph()
    assert not {m for m in graph if m.startswith("parity_tests")
                for d in graph[m] if d.startswith("benchmarks")}
    for reader in ("tl_torch.predict", "tl_torch.convert"):
        reached, todo = set(), [reader]
        while todo:
            for d in graph[todo.pop()] - reached:
                reached.add(d)
                todo.append(d)
        assert "tl_torch.train" not in reached, reader
