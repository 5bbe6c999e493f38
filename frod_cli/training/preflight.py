"""Checks before any work: the config beyond what its schema can say, the per-method settings of a
recipe, the output directory, the free disk space and the resume point. Each refusal is one line."""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

from frod_cli import FrodCliError

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
    if cfg.task.objective_mode not in ("max", "min"):
        raise FrodCliError(f"task.objective_mode must be max or min, got {cfg.task.objective_mode!r}")
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
    if int(cfg.task.max_length) < 1:
        raise FrodCliError(f"task.max_length must be at least 1 token, got {cfg.task.max_length}")
    _positive_number(oc.lr, "optimizer.lr")
    _positive_number(oc.lr_scale, "optimizer.lr_scale")
    for name, value in (oc.group_lr or {}).items():
        _positive_number(value, f"optimizer.group_lr.{name}")
    tm = cfg.method.target_modules
    if tm is not None and not isinstance(tm, str) and not all(isinstance(t, str) for t in tm):
        raise FrodCliError(f"method.target_modules must be a list of module-path suffixes or one regex string, got {tm!r}")


def run_dir(cfg: Any, default: Optional[str]) -> Optional[str]:
    """The run directory: the one `resume` continues, else output_dir, else `default` (Hydra's run dir)."""
    return cfg.resume or cfg.output_dir or default


def check_output_dir(path: str) -> None:
    """An output directory that cannot be written is refused before anything else happens."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".frod-write-probe-", dir=path)
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
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise FrodCliError(
            f"output directory {path} has {free / 2**20:.1f} MiB free; this run needs about "
            f"{need_bytes / 2**20:.1f} MiB (checkpoints, adapter, merged model): free space or pick another output_dir"
        )


def plain_config(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def resume_point(cfg: Any, output_dir: str, main: bool) -> Optional[str]:
    """The checkpoint to continue from: resume=<run dir>, or an incomplete run of the same config in
    output_dir (automatic). Refuses a directory that is not a resumable run of this config."""
    from frod_cli.training import checkpoint as ck

    if cfg.resume:
        where = cfg.resume
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
    if latest is None or os.path.exists(os.path.join(output_dir, "metrics.json")):
        return None
    ck.check_same_run(ck.saved_config(latest), plain_config(cfg), f"output directory {output_dir}")
    if main:
        log.info("output directory %s holds an incomplete run of this config: resuming from %s", output_dir, latest)
    return latest
