"""Every schema in Hydra's ConfigStore: the verbs' run configs (frod_cli/config.py), each method's config
(frod_cli/methods/, group `method`, `<name>_schema`) and each task type's config (frod_cli/tasks/, group
`task/schema`, `<type>`). Above config, methods and tasks, so none of them imports another to register."""
from __future__ import annotations


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from frod_cli import config as C
    from frod_cli.methods import register_schemas
    from frod_cli.tasks import register_task_schemas

    from frod_cli.paths import register_resolver

    register_resolver()  # ${frod_dir:runs} in the recipes
    cs = ConfigStore.instance()
    for name, node in (("frod_train_schema", C.FrodRunConfig), ("frod_eval_schema", C.EvalRunConfig),
                       ("frod_merge_schema", C.MergeRunConfig), ("frod_generate_schema", C.GenerateRunConfig),
                       ("frod_export_schema", C.ExportRunConfig), ("frod_cache_schema", C.CacheRunConfig),
                       ("frod_push_schema", C.PushRunConfig)):
        cs.store(name=name, node=node)
    register_schemas()
    register_task_schemas()
