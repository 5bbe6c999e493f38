"""Prompt templates over a data set's columns: Python format strings (`{question}`, nested fields as in
`{choices[text]}`), plus two conversions for lists of options: `{choices[text]!l}` renders
"A. first\\nB. second ..." and `{choices[text]!n}` renders "1. first\\n2. second ...". An unknown field
is refused in one line naming the template and the columns there are."""
from __future__ import annotations

import string
from typing import Any, Dict, List, Sequence

from frod_cli import FrodCliError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _Formatter(string.Formatter):
    def convert_field(self, value: Any, conversion: Any) -> Any:
        if conversion in ("l", "n"):
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            marks = LETTERS if conversion == "l" else [str(i + 1) for i in range(len(items))]
            return "\n".join(f"{m}. {v}" for m, v in zip(marks, items))
        return super().convert_field(value, conversion)


_FORMATTER = _Formatter()


def fields(template: str) -> List[str]:
    """The columns a template reads (the root of each field: `choices` for `{choices[text]}`)."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as e:
        raise FrodCliError(f"template {template!r} is not a valid format string ({e})") from None
    roots = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise FrodCliError(f"template {template!r}: every field needs a column name, got {{{name}}}")
        if root not in roots:
            roots.append(root)
    return roots


def check(template: str, columns: Sequence[str], key: str) -> None:
    """Refuse a template naming a column the data set does not have."""
    missing = [f for f in fields(template) if f not in columns]
    if missing:
        raise FrodCliError(f"{key} names unknown field {missing[0]!r}; columns: {', '.join(columns)}")


def render(template: str, row: Dict[str, Any], key: str = "template") -> str:
    try:
        return _FORMATTER.format(template, **row)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise FrodCliError(f"{key} {template!r} cannot be filled from an example ({type(e).__name__}: {e})") from None
