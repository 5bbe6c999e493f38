"""`frod train [recipe=<name>] [group=option ...] [key=value ...]`: one run (or a sweep with -m) of the training
recipe (frod_cli/training/recipe.py) in its run directory."""
from __future__ import annotations

import os
import tempfile
from typing import Any, List, Sequence

from frod_cli import FrodCliError
from frod_cli.commands import Prepared, register_verb


def distributed_rank() -> int:
    for var in ("RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


DATA_FILES = "task.data_files."


def user_data_args(args: Sequence[str]) -> List[str]:
    """`task.data_files.<split>=<file>` with or without `+`: the key is the user's either way (Hydra would refuse
    one form or the other depending on whether the recipe has the key), so both become `++` (add or override).
    The recipe then trains on these files (frod_cli.training.preflight.apply_user_data)."""
    out = []
    for a in args:
        key = a.split("=", 1)[0]
        if "=" in a and key.lstrip("+").startswith(DATA_FILES) and not key.startswith("~"):
            a = "++" + a.lstrip("+")
        out.append(a)
    return out


# The directories Hydra makes for a single run's hydra.run.dir (it and its missing parents, as noted before Hydra
# creates them): a refused run removes those still empty. A sweep's job directories are new by construction.
HYDRA_MADE: List[str] = []

try:
    from hydra.experimental.callback import Callback as _Callback
except Exception:  # noqa: BLE001  # pragma: no cover
    _Callback = object


class RunDirCallback(_Callback):
    """Configured in recipes/config.yaml (hydra.callbacks). Hydra creates hydra.run.dir with its parents before
    frod train has checked anything (runs/<recipe>/<time> in a new directory makes three): note which of them
    do not exist yet, so that a refused run leaves none behind."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from frod_cli.runs.directory import missing_dirs

        HYDRA_MADE[:] = missing_dirs(str(config.hydra.run.dir))


def task_type_switch(args: Sequence[str]) -> List[str]:
    """`task.type=<type>` switches the task's schema too (the task YAML names its type's config in its defaults, as
    `/task/schema@_here_`): the keys of the new type are then what the composed config accepts. A sweep over task
    types is refused: each type needs its own task (sweep over task=<name> instead)."""
    from frod_cli.tasks import available

    out = list(args)
    for a in args:
        key, _, value = a.partition("=")
        if key.lstrip("+") != "task.type" or not value:
            continue
        if "," in value or value.startswith(("choice(", "range(", "glob(")):
            raise FrodCliError(f"{a}: a sweep over task types is not supported; sweep over task=<name> instead")
        if value not in available():
            raise FrodCliError(f"unknown task type {value!r}; known: {', '.join(available())}")
        if not any(o.split("=", 1)[0].lstrip("+") == "task/schema@task" for o in args):
            out.append(f"task/schema@task={value}")
    return out


def prepare(args: Sequence[str]) -> Prepared:
    """Hydra overrides added for `frod train`: resume=<dir> continues in <dir> (and leaves its .hydra/
    alone); a non-main rank of a multi-process launch writes no run directory of its own (the run
    directory is the main process's, broadcast by the recipe)."""
    import shutil

    args = task_type_switch(user_data_args(args))
    names = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    multirun = any(a in ("-m", "--multirun") for a in args)
    resume = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == "resume"), None)
    cleanup = None
    if resume and not multirun and resume not in ("null", "None", ""):
        if not os.path.isdir(resume):  # before Hydra creates it as the run directory
            raise FrodCliError(f"resume: no such run directory: {resume}")
        if "hydra.run.dir" not in names:
            args.append(f"hydra.run.dir={resume}")
    if distributed_rank() > 0 and not multirun:
        tmp = tempfile.mkdtemp(prefix="frod-rank-")
        args = [a for a in args if a.split("=", 1)[0] not in ("hydra.run.dir", "hydra.output_subdir")]
        args += [f"hydra.run.dir={tmp}", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
        cleanup = lambda: shutil.rmtree(tmp, ignore_errors=True)  # noqa: E731
    return args, cleanup


def hydra_value(text: str) -> str:
    """`text` as the value of a Hydra override (quoted unless it is a plain path)."""
    import re

    if re.fullmatch(r"[\w./~+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check(composed: Any, args: Sequence[str]) -> List[str]:
    """Before Hydra creates anything: the directory the run (or the sweep) writes is writable (probed in it, or in
    the nearest directory above it that exists), and a sweep's directory is locked for the whole sweep (its
    jobs lock their own run directories); the sweep directory is pinned to the value checked (its default
    holds the time, which Hydra would read again)."""
    from omegaconf import OmegaConf

    from frod_cli.runs.lock import hold
    from frod_cli.training.preflight import check_output_dir

    args = list(args)
    if any(a in ("-m", "--multirun") for a in args):
        sweep = str(OmegaConf.select(composed, "hydra.sweep.dir"))
        check_output_dir(sweep)
        hold(sweep, "sweep directory")
        return [a for a in args if a.split("=", 1)[0] != "hydra.sweep.dir"] + [f"hydra.sweep.dir={hydra_value(sweep)}"]
    if distributed_rank() == 0:
        check_output_dir(str(composed.get("resume") or composed.get("output_dir") or composed.hydra.run.dir))
    return args


@register_verb("train", config="config", prepare=prepare, check=check,
               summary="train a recipe (default recipe: quickstart, offline on CPU); -m for sweeps")
def run(cfg: Any) -> float:
    """One run. Hydra's run directory is only a default: the recipe decides where it writes (a finished run is
    refused or replaced at the end, frod_cli/runs/directory.py) and writes nothing there before it accepts the
    run. A directory Hydra created for a run that was then refused is removed again."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from frod_cli.runs.directory import RunLog, remove_if_empty
    from frod_cli.runs.lock import scope
    from frod_cli.training import recipe_main
    from frod_cli.training.builders import import_libraries

    import_libraries(str(cfg.method.name), str(cfg.task.type))  # before the run's clock starts
    hc = HydraConfig.get()
    hydra_dir = hc.runtime.output_dir
    made = list(HYDRA_MADE) if hc.mode == RunMode.RUN else [hydra_dir]
    overrides = list(hc.overrides.task)
    hydra_files = {"hydra_config": hc, "overrides": overrides}
    run_log = RunLog() if distributed_rank() == 0 else None
    try:
        with scope():  # the run directory's lock (taken by the recipe) ends with the run, a sweep's job included
            return recipe_main(cfg, hydra_dir, overrides, hydra_files=hydra_files, run_log=run_log)
    finally:
        if run_log is not None:
            run_log.close()
        remove_if_empty(made)  # made by Hydra for a run that went elsewhere or was refused (only while empty)
        HYDRA_MADE.clear()
