"""Every schema in Hydra's ConfigStore: the verbs' run configs (frod_cli/config.py), each method's config
(frod_cli/methods/, group `method`, `<name>_schema`) and each task type's config (frod_cli/tasks/, group
`task/schema`, `<type>`). Above config, methods and tasks, so none of them imports another to register."""
from __future__ import annotations

from typing import Any, Optional


_STORED: dict = {}  # (group, name) -> the dataclass stored there, in this process


def _store(group: Optional[str], entry: str, cls: type, **values: Any) -> None:
    """`cls(**values)` as `group/entry` in Hydra's ConfigStore, once per process: a store converts the dataclass
    (milliseconds each, twenty-odd schemas) and every verb call registers. A class registered later under a new
    name (a task type a plugin adds) is stored then."""
    if _STORED.get((group, entry)) is cls:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=entry, node=cls(**values))
    _STORED[(group, entry)] = cls


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore: the verbs' run configs, group `method` (`<name>_schema`, listed
    first in recipes/method/<name>.yaml's defaults) and group `task/schema` (`<type>`: a task YAML lists
    `- /task/schema@_here_: <type>` first; `task.type=<type>` on the command line swaps it)."""
    from frod_cli import config as C
    from frod_cli.methods import CONFIGS, discover as discover_methods
    from frod_cli.paths import register_resolver
    from frod_cli.tasks import TASK_CONFIGS, discover as discover_tasks

    register_resolver()  # ${frod_dir:runs} in the recipes
    for name, node in (("frod_train_schema", C.FrodRunConfig), ("frod_eval_schema", C.EvalRunConfig),
                       ("frod_merge_schema", C.MergeRunConfig), ("frod_generate_schema", C.GenerateRunConfig),
                       ("frod_export_schema", C.ExportRunConfig), ("frod_cache_schema", C.CacheRunConfig),
                       ("frod_push_schema", C.PushRunConfig)):
        _store(None, name, node)
    discover_methods()
    for name, cls in CONFIGS.items():
        _store("method", f"{name}_schema", cls, name=name)
    discover_tasks()
    for name, cls in TASK_CONFIGS.items():
        _store("task/schema", name, cls, type=name)
