"""The training path: builders (shared with eval, merge and generate), preflight checks, the recipe
class and its TrainState, checkpoints, evaluation and trackers. `recipe_main` is `frod train`."""
from frod_cli.training.recipe import FinetuneRecipe, recipe_main

__all__ = ["FinetuneRecipe", "recipe_main"]
