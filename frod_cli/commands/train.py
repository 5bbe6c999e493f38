"""`frod train [recipe=<name>] [group=option ...] [key=value ...]`: one run (or a sweep with -m) of the training
recipe (frod_cli/training/recipe.py) in its run directory."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

from frod_cli import FrodCliError
from frod_cli.commands import Prepared, register_verb


def distributed_rank() -> int:
    for var in ("RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def prepare(args: Sequence[str]) -> Prepared:
    """Hydra overrides added for `frod train`: resume=<dir> continues in <dir> (and leaves its .hydra/
    alone); a non-main rank of a multi-process launch writes no run directory of its own (the run
    directory is the main process's, broadcast by the recipe)."""
    import shutil

    args = list(args)
    names = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    multirun = any(a in ("-m", "--multirun") for a in args)
    resume = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == "resume"), None)
    cleanup = None
    if resume and not multirun and resume not in ("null", "None", ""):
        if not os.path.isdir(resume):  # before Hydra creates it as the run directory
            raise FrodCliError(f"resume: no such run directory: {resume}")
        if "hydra.run.dir" not in names:
            args.append(f"hydra.run.dir={resume}")
        if "hydra.output_subdir" not in names:
            args.append("hydra.output_subdir=null")
    run_dir = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "hydra.run.dir"), None)
    if (not multirun and run_dir and "hydra.output_subdir" not in names
            and os.path.isdir(os.path.join(run_dir, "checkpoints"))
            and not os.path.exists(os.path.join(run_dir, "metrics.json"))):
        # an incomplete run: the recipe resumes it (same config) or refuses it; its .hydra/ stays as it is
        args.append("hydra.output_subdir=null")
    if distributed_rank() > 0 and not multirun:
        tmp = tempfile.mkdtemp(prefix="frod-rank-")
        args = [a for a in args if a.split("=", 1)[0] not in ("hydra.run.dir", "hydra.output_subdir")]
        args += [f"hydra.run.dir={tmp}", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
        cleanup = lambda: shutil.rmtree(tmp, ignore_errors=True)  # noqa: E731
    return args, cleanup


@register_verb("train", config="config", prepare=prepare,
               summary="train a recipe (default recipe: quickstart, offline on CPU); -m for sweeps")
def run(cfg: Any) -> float:
    from hydra.core.hydra_config import HydraConfig

    from frod_cli.training import recipe_main

    hc = HydraConfig.get()
    return recipe_main(cfg, hc.runtime.output_dir, list(hc.overrides.task))
