"""The code's shape, as the contributing rules state it: no function under frod_cli/ (the benchmark package
included) longer than 60 lines (counted with ast: decorator to last line), the training loop's module at most 350
lines (it keeps the loop; what it writes, checkpoints, merges and measures lives beside it), and no module importing
another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "frod_cli"
SOURCES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def long_functions(limit: int = 60, sources=SOURCES):
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - start + 1
                if length > limit:
                    yield f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_longer_than_60_lines():
    assert len([p for p in SOURCES if p.parent.name == "bench"]) >= 5  # the benchmark package is looked at too
    assert list(long_functions()) == []


def test_the_training_loop_module_stays_short():
    lines = len((ROOT / "training" / "recipe.py").read_text(encoding="utf-8").splitlines())
    assert lines <= 350, f"frod_cli/training/recipe.py has {lines} lines"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_of_private_names(path):
    """`from frod_cli.x import _private` couples modules through what they meant to hide."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ours = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.level > 0 or (n.module or "").startswith("frod_cli"))]
    bad = [f"{n.module}.{a.name}" for n in ours for a in n.names
           if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parents(module: str) -> set:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict:
    """module -> the frod_cli modules it imports, anywhere in its code (inside functions too). Importing a.b.c
    runs the packages a and a.b first, so they count as imported too; a module's imports of its own parent
    packages do not (a package importing its children is how packages work)."""
    modules = {_module_name(p): p for p in SOURCES}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `from pkg import name`: the deepest module it names
                    t = t.rpartition(".")[0]
                if t:
                    edges |= {x for x in {t} | _parents(t) if x != name and x not in _parents(name)}
        graph[name] = edges
    return graph


def import_cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_cycle_inside_frod_cli():
    assert import_cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself: a circle through a package and a function-level import is found."""
    graph = {"a": {"b"}, "b": {"c.d"}, "c.d": {"a"}, "e": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c.d"]]
    graph = import_graph()
    assert "frod_cli.decoding" in graph["frod_cli.tasks.causal_lm"]  # an import inside a function counts
    assert "frod_cli.tasks" not in graph["frod_cli.tasks.causal_lm"]  # its own parent package does not


def test_the_longest_scopes_name_tests_that_exist():
    """tests/conftest.py orders the suite's scopes by LONGEST_SCOPES: a renamed module or class would silently lose
    its place."""
    from conftest import LONGEST_SCOPES

    for scope in LONGEST_SCOPES:
        path, _, cls = scope.partition("::")
        file = ROOT.parent / path  # ROOT is frod_cli/
        assert file.is_file(), scope
        assert not cls or f"\nclass {cls}" in file.read_text(), scope
