"""`frod eval path=<run dir | model dir> [task=...]`: the metrics the end of training reports, for a run
(its merged/ model, or base model + adapter/) or any saved model directory."""
from __future__ import annotations

import os
from typing import Any, Dict

from frod_cli import FrodCliError
from frod_cli.commands import register_verb


@register_verb("eval", config="eval", summary="metrics of a run directory or model:  frod eval path=<dir> [task=<name>]")
def run(cfg: Any) -> Dict[str, Any]:
    from accelerate import Accelerator

    from frod_cli.console import fmt_metrics
    from frod_cli.runs import atomic_write_json
    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import Evaluator, majority_accuracy

    B.quiet_libraries()
    t = B.load_trained(cfg.path, use_adapter=bool(cfg.use_adapter), task_cfg=cfg.task, seed=cfg.seed)
    model, pre, task, data, what = t.model, t.preprocessor, t.task, t.data, t.what
    acc = Accelerator(cpu=bool(cfg.cpu))
    encoded = B.encode_data(task, data, pre)
    model = acc.prepare(model)
    evaluator = Evaluator(task, acc, encoded, task.collate(pre), int(cfg.batch_size))
    results: Dict[str, Any] = {"path": os.path.abspath(cfg.path), "model": what, "task": task.cfg.name}
    for split in cfg.splits:
        if not evaluator.has(split):
            raise FrodCliError(f"task {task.cfg.name} has no {split!r} split (has {', '.join(encoded)})")
        res = evaluator.split(model, split)
        results[split] = res.metrics
        maj = majority_accuracy(res.references)
        if maj is not None:
            results[f"{split}_majority_class_accuracy"] = maj
    out = cfg.output or os.path.join(os.path.abspath(cfg.path), "eval.json")
    if acc.is_main_process:
        atomic_write_json(out, results)
        for split in cfg.splits:
            print(f"{split:<10} {fmt_metrics(results[split])}")
        print(f"wrote {out}")
    return results
