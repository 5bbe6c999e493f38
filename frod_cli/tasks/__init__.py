"""Task registry: name -> a `Task` and its config dataclass (see base.py). Every module of this package is imported
with it, so adding a task type is one file here plus one YAML in recipes/task/."""
from __future__ import annotations

from typing import Any

from frod_cli import import_submodules

from .base import TASK_CONFIGS, TASKS, Task, register_task

_DISCOVERED = False


def discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import_submodules(__name__, __path__)  # the task types register themselves; shared helpers import harmlessly
    _DISCOVERED = True


def get_task(type_name: str) -> type:
    """The Task class registered as `type_name`."""
    discover()
    try:
        return TASKS[type_name]
    except KeyError:
        raise ValueError(f"unknown task type {type_name!r}; known: {', '.join(sorted(TASKS))}") from None


def available() -> list:
    discover()
    return sorted(TASKS)


def task_config(type_name: str, **values: Any) -> Any:
    """The typed config of task type `type_name` (an OmegaConf node) with `values` set: for code and tests."""
    from omegaconf import OmegaConf

    cls = get_task(type_name).config_class
    return OmegaConf.merge(OmegaConf.structured(cls(type=type_name)), values)


discover()

__all__ = ["Task", "TASKS", "TASK_CONFIGS", "available", "discover", "get_task", "register_task", "task_config"]
