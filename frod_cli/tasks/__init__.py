"""Task registry: importing this package registers every task type (one module each)."""
from __future__ import annotations

from . import image_cls, multiple_choice, seq_cls  # noqa: F401  (registration side effects)
from . import causal_lm  # noqa: F401  (registration side effects)
from . import preference  # noqa: F401  (registration side effects)
from .base import TASKS, Task, register_task


def get_task(type_name: str) -> type:
    """The Task class registered as `type_name`."""
    try:
        return TASKS[type_name]
    except KeyError:
        raise ValueError(f"unknown task type {type_name!r}; known: {', '.join(sorted(TASKS))}") from None


__all__ = ["Task", "TASKS", "register_task", "get_task"]
