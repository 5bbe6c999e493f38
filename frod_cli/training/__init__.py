"""The training path: builders (shared with eval, merge and generate), preflight checks, the recipe
class and its TrainState, checkpoints, evaluation and trackers. `recipe_main` is `frod train`.

The recipe is imported on first use (PEP 562), so that a module of this package (checkpoint.py, read by
`frod eval` and by a process that only saves or loads checkpoints) does not pull the whole training stack in."""
from typing import Any

__all__ = ["FinetuneRecipe", "recipe_main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from frod_cli.training import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
