"""`frod eval path=<run dir | model dir> [task=...]`: the metrics the end of training reports, for a run
(its merged/ model, or base model + adapter/) or any saved model directory. With harness.tasks=[...] (or
harness=<recipes/harness/ name>), lm-evaluation-harness's tasks instead (frod_cli/harness/, harness.json)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Sequence

from frod_cli import FrodCliError
from frod_cli.commands import Prepared, register_verb
from frod_cli.config import override_keys


SPLITS = ("train", "validation", "test")
log = logging.getLogger("frod.eval")


def prepare(args: Sequence[str]) -> Prepared:
    """`task.data_files.<split>=<file>` with or without `+` (as for frod train)."""
    from frod_cli.commands.train import user_data_args

    return user_data_args(args), None


def check(cfg: Any) -> str:
    """Refuse what cannot be evaluated before any model loads; returns the output file."""
    from frod_cli.runs import is_run_dir
    from frod_cli.runs.directory import check_output
    from frod_cli.runs.lock import hold_output

    if not os.path.exists(os.path.expanduser(str(cfg.path))):
        raise FrodCliError(f"no such run directory or model directory: {cfg.path}")
    if cfg.use_adapter and not is_run_dir(os.path.expanduser(str(cfg.path))):
        raise FrodCliError(f"use_adapter=true needs a run directory (its base model + adapter/); {cfg.path} is not one")
    if int(cfg.batch_size) < 1:
        raise FrodCliError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if not cfg.splits:
        raise FrodCliError("splits is empty: name at least one of train, validation, test")
    unknown = [s for s in cfg.splits if s not in SPLITS]
    if unknown:
        raise FrodCliError(f"splits: unknown split {unknown[0]!r}; use {', '.join(SPLITS)}")
    out = output_file(cfg)
    check_output(out, bool(cfg.overwrite))
    hold_output(out)  # a run's own file: the run's lock (not while frod train holds it); else the file's own
    return out


def output_file(cfg: Any) -> str:
    """Where the metrics go: `<path>/eval.json` by default (`harness.json` for lm-evaluation-harness's tasks);
    a relative `output=` lies in `path` too (the run directory, or the model directory evaluated), said in the
    log; an absolute one where it names."""
    path = os.path.abspath(os.path.expanduser(str(cfg.path)))
    if cfg.output is None:
        return os.path.join(path, "harness.json" if cfg.harness.tasks else "eval.json")
    given = os.path.expanduser(str(cfg.output))
    if os.path.isabs(given):
        return given
    out = os.path.join(path, given)
    log.info("output=%s is a relative path: written into %s (%s)", given, cfg.path, out)
    return out


@register_verb("eval", config="eval", prepare=prepare,
               summary="metrics of a run directory or model:  frod eval path=<dir> [task=<name>]")
def run(cfg: Any) -> Dict[str, Any]:
    from accelerate import Accelerator
    from hydra.core.hydra_config import HydraConfig

    from frod_cli.console import fmt_metrics
    from frod_cli.runs import atomic_write_json
    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import Evaluator, majority_accuracy
    from frod_cli.training.preflight import apply_user_data

    out = check(cfg)
    from frod_cli import harness

    if harness.check(cfg, HydraConfig.get().overrides.task):  # lm-evaluation-harness (frod_cli/harness/)
        return harness.evaluate(cfg, out)
    if cfg.task is not None:
        apply_user_data(cfg.task, list(HydraConfig.get().overrides.task))
    B.quiet_libraries()
    t = B.load_trained(cfg.path, use_adapter=bool(cfg.use_adapter), task_cfg=cfg.task, seed=cfg.seed)
    model, pre, task, data, what = t.model, t.preprocessor, t.task, t.data, t.what
    acc = Accelerator(cpu=bool(cfg.cpu))
    encoded = B.encode_data(task, data, pre)
    if t.run is not None:  # what training stored for the task (preference: the reference log-probabilities)
        task.prepare_evaluation(encoded, os.path.abspath(os.path.expanduser(str(cfg.path))))
    model = acc.prepare(model)
    evaluator = Evaluator(task, acc, encoded, task.collate(pre), int(cfg.batch_size), method=t.method)
    results: Dict[str, Any] = {"path": os.path.abspath(cfg.path), "model": what, "task": task.cfg.name}
    splits = list(cfg.splits)
    present = [s for s in splits if evaluator.has(s)]
    if "splits" not in override_keys(HydraConfig.get().overrides.task) and present and present != splits:
        # the default [validation, test]: those the task has (a streamed run holds out validation only)
        log.info("splits: %s (task %s has no %s split)", ", ".join(present), task.cfg.name,
                 " or ".join(s for s in splits if s not in present))
        splits = present
    for split in splits:
        if not evaluator.has(split):
            raise FrodCliError(f"task {task.cfg.name} has no {split!r} split (has {', '.join(encoded)})")
        res = evaluator.split(model, split)
        results[split] = res.metrics
        maj = majority_accuracy(res.references)
        if maj is not None:
            results[f"{split}_majority_class_accuracy"] = maj
    if acc.is_main_process:
        atomic_write_json(out, results)
        for split in splits:
            print(f"{split:<10} {fmt_metrics(results[split])}")
        print(f"wrote {out}")
    return results
