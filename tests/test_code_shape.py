"""The code's shape, as the contributing rules state it: no function under frod_cli/ longer than 80
lines (counted with ast: decorator to last line), and no module importing another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "frod_cli"
SOURCES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def long_functions(limit: int = 80):
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - start + 1
                if length > limit:
                    yield f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_longer_than_80_lines():
    assert list(long_functions()) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_of_private_names(path):
    """`from frod_cli.x import _private` couples modules through what they meant to hide."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ours = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.level > 0 or (n.module or "").startswith("frod_cli"))]
    bad = [f"{n.module}.{a.name}" for n in ours for a in n.names
           if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []
