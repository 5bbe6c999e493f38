"""Checks before any work: the config beyond what its schema can say, the per-method settings of a
recipe, the output directory, the free disk space and the resume point. Each refusal is one line."""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from frod_cli import FrodCliError
from frod_cli.config import override_keys

log = logging.getLogger("frod.preflight")

SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
MIXED_PRECISION = ("no", "bf16", "fp16")


def _positive_number(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(float(value)) and value > 0):
        raise FrodCliError(f"{key} must be a positive number, got {value!r}")


def validate(cfg: Any) -> None:
    """Refuse values the schema's types admit but the run cannot use."""
    tc, oc = cfg.train, cfg.optimizer
    if oc.scheduler not in SCHEDULERS:
        raise FrodCliError(f"unknown optimizer.scheduler {oc.scheduler!r}; available: {', '.join(SCHEDULERS)}")
    if oc.name not in OPTIMIZERS:
        raise FrodCliError(f"unknown optimizer.name {oc.name!r}; available: {', '.join(OPTIMIZERS)}")
    if tc.mixed_precision not in MIXED_PRECISION:
        raise FrodCliError(f"train.mixed_precision must be no, bf16 or fp16, got {tc.mixed_precision!r}")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every"):
        if int(tc[key]) < 1:
            raise FrodCliError(f"train.{key} must be a positive integer, got {tc[key]}")
    for key in ("eval_every", "checkpoint_every", "num_workers", "early_stopping_patience"):
        if int(tc[key]) < 0:
            raise FrodCliError(f"train.{key} must be >= 0, got {tc[key]}")
    if int(tc.max_steps) == 0 or int(tc.max_steps) < -1:
        raise FrodCliError(f"train.max_steps must be a positive number of steps, or -1 to train "
                           f"train.epochs epochs; got {tc.max_steps}")
    if int(tc.max_steps) == -1 and not float(tc.epochs) > 0:
        raise FrodCliError(f"train.epochs must be > 0 (or set train.max_steps), got {tc.epochs}")
    _positive_number(oc.lr, "optimizer.lr")
    _positive_number(oc.lr_scale, "optimizer.lr_scale")
    for name, value in (oc.group_lr or {}).items():
        _positive_number(value, f"optimizer.group_lr.{name}")
    quantization = str(cfg.model.get("quantization", "none"))
    if quantization != "none":
        from frod_cli.methods import get_method

        refusal = get_method(cfg.method.name).refuse_quantized
        if refusal:
            raise FrodCliError(f"method={cfg.method.name} on model.quantization={quantization}: {refusal}")
    tm = cfg.method.target_modules
    if tm is not None and not isinstance(tm, str) and not all(isinstance(t, str) for t in tm):
        raise FrodCliError(f"method.target_modules must be a list of module-path suffixes or one regex string, got {tm!r}")


# What `task.type=<type>` on the command line resets to the new type's defaults (its config dataclass's), unless
# the command line names them too: the recipe's task chose them for its own type.
TYPE_DEFAULTS = ("objective", "objective_mode", "metrics")


def apply_task_defaults(task: Any, user_overrides: Sequence[str]) -> None:
    """`task.type=<type>` on the command line switches the task type (frod train's prepare swaps the schema): its
    objective and metrics follow the new type unless the command line names them too."""
    from frod_cli.tasks import get_task
    from frod_cli.tasks.base import schema_defaults

    keys = override_keys(user_overrides)
    if "task.type" not in keys:
        return
    defaults = schema_defaults(get_task(task.type).config_class)
    changed = {k: defaults[k] for k in TYPE_DEFAULTS if k in defaults and f"task.{k}" not in keys and task[k] != defaults[k]}
    for k, v in changed.items():
        task[k] = v
    if changed:
        log.info("task.type=%s: %s (its defaults)", task.type, ", ".join(f"task.{k}={v}" for k, v in changed.items()))


DATA_FILES = "task.data_files."


def user_data_splits(user_overrides: Sequence[str]) -> list:
    """The splits the command line gives files for: `task.data_files.<split>=<file>` (with or without +), or
    `task.data_files={<split>: <file>, ...}`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = override_keys(user_overrides)
    given = {k[len(DATA_FILES):] for k in keys if k.startswith(DATA_FILES)}
    whole = [o for o in user_overrides if o.lstrip("+").split("=", 1)[0] == DATA_FILES[:-1]]
    for override in OverridesParser.create().parse_overrides(whole) if whole else []:
        value = override.value()
        if isinstance(value, dict):
            given |= {str(k) for k in value}
    return sorted(given)


def apply_user_data(task: Any, user_overrides: Sequence[str]) -> None:
    """The user's data wins: `task.data_files.<split>=<file>` on the command line makes the task read those local
    files, whatever source the recipe's task had (a packaged set, a Hub dataset). The recipe's own files, Hub id
    and separate test set are dropped, each with a log line; a file for a split the task does not name becomes
    that split (validation / test), and any other split name is refused. The task is then named after the data
    (the train file's stem: logs, metrics.json, the loss plot) and its layout read from the files' columns
    (data_format auto), unless the command line names them (task.name, task.data_format). A data set named on the
    command line (task.dataset=...) names the task too."""
    from omegaconf import open_dict

    keys = override_keys(user_overrides)
    given = user_data_splits(user_overrides)
    if not given:
        if "task.dataset" in keys and "task.name" not in keys and not task.get("mixture"):
            with open_dict(task):
                _name_after_data(task)  # another data set named on the command line: the same rule
        return
    if "task.source" in keys and task.source != "local":
        raise FrodCliError(f"task.data_files are local files but task.source={task.source}: drop one of the two")
    if task.train_split not in given:
        raise FrodCliError(f"task.data_files names {', '.join(given)} but no {task.train_split!r} file: with your own "
                           f"files, give task.data_files.{task.train_split}=<file> too")
    with open_dict(task):
        _name_user_splits(task, given, keys)
        dropped = {k: v for k, v in task.data_files.items() if k not in given}
        if dropped:
            log.info("the recipe's task.data_files %s are not used: your files replace its data", dict(dropped))
        task.data_files = {k: v for k, v in task.data_files.items() if k in given}
        if task.source != "local":
            log.info("task.data_files given: task.source %s%s -> local files", task.source,
                     f" ({task.dataset})" if task.dataset else "")
        task.source, task.dataset, task.subset = "local", None, None
        if task.test_dataset and "task.test_dataset" not in keys:
            log.info("the recipe's task.test_dataset %s is not used: your files replace its data", task.test_dataset)
            task.test_dataset = None
        if task.format and "task.format" not in keys:
            task.format = None  # guessed from your files' suffix
        if task.get("data_format", "auto") != "auto" and "task.data_format" not in keys:
            log.info("task.data_format %s -> auto: the layout of your files is read from their columns "
                     "(task.data_format=... names it)", task.data_format)
            task.data_format = "auto"
        if "task.name" not in keys:
            _name_after_data(task)


def _name_after_data(task: Any) -> None:
    """task.name from the data the command line gave (a file's stem, a data set's id or offline name)."""
    from frod_cli.tasks.mixture import default_name

    name = default_name(task)
    if name != task.name:
        log.info("task.name %s -> %s: the name of your data (task.name=... names it otherwise)", task.name, name)
        task.name = name


def _name_user_splits(task: Any, given: Sequence[str], keys: Any) -> None:
    """A file for validation / test becomes that split when the task names none; any other split is refused."""
    for split in given:
        if split in (task.train_split, task.validation_split, task.test_split):
            continue
        if split == "validation" and "task.validation_split" not in keys:
            task.validation_split = "validation"
        elif split == "test" and "task.test_split" not in keys:
            task.test_split = "test"
        else:
            raise FrodCliError(f"task.data_files.{split}: not a split of this task (train_split={task.train_split}, "
                               f"validation_split={task.validation_split}, test_split={task.test_split})")


def run_dir(cfg: Any, default: Optional[str]) -> Optional[str]:
    """The run directory: the one `resume` continues, else output_dir, else `default` (Hydra's run dir)."""
    return cfg.resume or cfg.output_dir or default


def existing_ancestor(path: str) -> str:
    """`path` if it is a directory, else the nearest directory above it (where it would be created)."""
    where = os.path.abspath(path)
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        if os.path.exists(where):
            raise FrodCliError(f"output directory {path} is not writable ({where} is a file, not a directory)")
        where = os.path.dirname(where)
    return where


def check_output_dir(path: str) -> None:
    """An output directory that cannot be written is refused before anything else happens: the probe goes into
    `path` if it exists, else into the directory it would be created in (nothing is created here)."""
    where = existing_ancestor(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".frod-write-probe-", dir=where)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise FrodCliError(f"output directory {path} is not writable ({e.strerror or e})") from None


def disk_need(model: Any, save_merged: bool) -> int:
    """Bytes a run writes: 2 checkpoints x (values + best + 2 optimizer moments), the adapter, merged/."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * 4 * trainable + trainable + (total if save_merged else 0) + 2**20


def check_free_space(path: str, need_bytes: int) -> None:
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < need_bytes:
        raise FrodCliError(
            f"output directory {path} has {free / 2**20:.1f} MiB free; this run needs about "
            f"{need_bytes / 2**20:.1f} MiB (checkpoints, adapter, merged model): free space or pick another output_dir"
        )


def plain_config(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


@dataclass
class OutputPlan:
    """Where a run writes (`run_dir`) and where it ends up (`final_dir`: another directory only when
    train.overwrite replaces a finished run, which is swapped into place at the end); the checkpoint it resumes;
    whether a failed run of the same command is restarted in place (its files cleared at acceptance)."""

    run_dir: str
    final_dir: str
    resume_from: Optional[str] = None
    restart: bool = False

    @property
    def replaces(self) -> bool:
        return self.run_dir != self.final_dir


def plan_output(cfg: Any, target: str, user_overrides: Sequence[str]) -> OutputPlan:
    """What `frod train` does with its directory (frod_cli/runs/directory.py has the table); every refusal is
    one line, and nothing is written here."""
    from frod_cli.runs import directory as rd

    overwrite = bool(cfg.train.overwrite)
    if cfg.resume:
        if overwrite:
            raise FrodCliError("resume= continues an unfinished run; train.overwrite=true replaces a finished one: "
                               "drop one of the two")
        return OutputPlan(target, target, resume_point(cfg, target, resume=True))
    rd.recover_swap(target)
    state = rd.state_of(target)
    if state == rd.NEW:
        return OutputPlan(target, target)
    if state == rd.INCOMPLETE and not overwrite:
        return OutputPlan(target, target, resume_point(cfg, target, resume=False))
    if state == rd.FAILED and rd.same_command(target, user_overrides):
        log.info("output directory %s holds a run of this command that failed before its first checkpoint: "
                 "starting it again", target)
        return OutputPlan(target, target, restart=True)
    if state == rd.FOREIGN:
        raise FrodCliError(f"output directory {target} holds files that are not a frod run "
                           f"({', '.join(rd.leftovers(target))}): frod train writes into a new or empty directory")
    if not overwrite:
        what = {rd.FINISHED: "a finished run (metrics.json)",
                rd.FAILED: "a run of another command that failed before its first checkpoint"}[state]
        raise FrodCliError(f"output directory {target} holds {what}: train.overwrite=true replaces it once the new "
                           "run has finished, or pick another hydra.run.dir")
    return _plan_replacement(cfg, target, user_overrides)


def _plan_replacement(cfg: Any, target: str, user_overrides: Sequence[str]) -> OutputPlan:
    """train.overwrite=true: the new run trains in the hidden sibling and replaces `target` when it finishes; a
    sibling left by a killed attempt is resumed (same config) or restarted (same command)."""
    from frod_cli.runs import directory as rd

    staging = rd.staging_dir(target)
    state = rd.state_of(staging)
    log.info("train.overwrite: %s is replaced when this run finishes (until then it trains in %s)", target, staging)
    if state == rd.NEW:
        return OutputPlan(staging, target)
    if state == rd.INCOMPLETE:
        return OutputPlan(staging, target, resume_point(cfg, staging, resume=False))
    if state == rd.FAILED and rd.same_command(staging, user_overrides):
        return OutputPlan(staging, target, restart=True)
    raise FrodCliError(f"{staging} (left by an earlier train.overwrite of {target}) holds another run: move it "
                       "away or delete it")


def resume_point(cfg: Any, output_dir: str, resume: bool) -> Optional[str]:
    """The checkpoint to continue from: resume=<run dir>, or an incomplete run of the same config in
    output_dir (automatic). Refuses a directory that is not a resumable run of this config."""
    from frod_cli.training import checkpoint as ck

    if resume:
        where = output_dir
        if not os.path.isdir(where):
            raise FrodCliError(f"resume: no such run directory: {where}")
        latest = ck.latest_checkpoint(where)
        if latest is None:
            raise FrodCliError(f"resume: {where} has no checkpoint (checkpoints/step-*/) to continue from")
        if os.path.exists(os.path.join(where, "metrics.json")):
            raise FrodCliError(f"resume: {where} is a finished run (metrics.json exists); nothing to continue")
        ck.check_same_run(ck.saved_config(latest), plain_config(cfg), where)
        return latest
    latest = ck.latest_checkpoint(output_dir)
    ck.check_same_run(ck.saved_config(latest), plain_config(cfg), f"output directory {output_dir}")
    log.info("output directory %s holds an incomplete run of this config: resuming from %s", output_dir, latest)
    return latest


def settle_output(cfg: Any, acc: Any, requested: Optional[str], user_overrides: Sequence[str]) -> OutputPlan:
    """Where the run goes: plan_output on the main process, which holds the directory's lock to the end of the
    command (what plan_output finds is still so when the run is accepted); every process gets its answer, or
    stops with its refusal (none waits on it)."""
    from accelerate.utils import broadcast_object_list

    from frod_cli.runs.lock import hold

    target = run_dir(cfg, requested)
    if target is None:
        raise FrodCliError("no output directory (run through `frod train` or set output_dir=...)")
    if cfg.resume and cfg.output_dir and os.path.abspath(cfg.output_dir) != os.path.abspath(cfg.resume):
        raise FrodCliError("resume continues in the run directory it names: drop output_dir")
    out: List[Any] = [None]
    if acc.is_main_process:
        try:
            hold(target)
            check_output_dir(target)
            out = [plan_output(cfg, target, user_overrides)]
        except FrodCliError as e:
            out = [e]
    if acc.num_processes > 1:  # one output directory for all processes: the main process's
        broadcast_object_list(out)
    if isinstance(out[0], FrodCliError):
        raise out[0]
    return out[0]
