"""What a training run writes into its directory: on the main process only, each file atomically.

  .hydra/            the composed config as it runs and the overrides (written at acceptance: runs/directory.py)
  train.log          the run's log (records before acceptance wait in a RunLog buffer)
  metrics.jsonl      one line per log step (step, loss, lr, throughput, memory) and per evaluation
  metrics.json       final metrics of the best checkpoint (validation, test), trainable params, times, memory
  predictions.jsonl  per-example predictions of the best checkpoint (tasks that evaluate by generation)
  adapter/           the best checkpoint's adapter (method.save_adapter), with its model card
  merged/            a plain transformers model + preprocessor (AutoModelFor...from_pretrained), with its card
  loss.png           the loss curve
  trackers/          experiment-tracker files (train.log_with, e.g. TensorBoard event files)
  checkpoints/       step-N/ (frod_cli/training/checkpoint.py) for resume=<run dir>; removed at the end unless
                     train.keep_checkpoints=true
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional

from frod_cli.runs import directory as rd
from frod_cli.runs.io import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl, recover_atomic_dir
from frod_cli.runs.reader import CHECKPOINTS, RunPaths

log = logging.getLogger("frod.train")


class RunWriter:
    """One run's directory as the training loop fills it. `plan` is preflight.plan_output's answer (run_dir,
    final_dir, restart, replaces); every method is a no-op on a process that is not the main one."""

    def __init__(self, plan: Any, main: bool, run_log: Optional[Any] = None):
        self.plan, self.main, self.run_log = plan, main, run_log
        self.paths = RunPaths.of(plan.run_dir)
        self.jsonl: Optional[JsonlWriter] = None
        self.best_records: List[Dict[str, Any]] = []  # the best checkpoint's validation predictions

    def accept(self, config: Any, hydra_files: Optional[Dict[str, Any]], resumed_log_bytes: Optional[int]) -> None:
        """The run is accepted: its directory, .hydra/ (a new run), train.log, metrics.jsonl. A resumed run
        (resumed_log_bytes: what metrics.jsonl held at its checkpoint) gets its half-written directories back and
        its log cut to the checkpoint."""
        if not self.main:
            return
        plan = self.plan
        os.makedirs(plan.run_dir, exist_ok=True)
        if plan.restart:
            rd.clear_failed_run(plan.run_dir)
        if resumed_log_bytes is not None:
            for d in (self.paths.adapter, self.paths.merged):
                recover_atomic_dir(str(d))
            self.truncate_log(resumed_log_bytes)
        elif hydra_files is not None:  # the config as it runs: per_method, task.type, your data applied
            rd.write_hydra_files(plan.run_dir, config=config, **hydra_files)
        if self.run_log is not None:
            self.run_log.open(os.path.join(plan.run_dir, "train.log"))
        self.jsonl = JsonlWriter(str(self.paths.log))

    def truncate_log(self, size: int) -> None:
        """metrics.jsonl as it was at the checkpoint: what was logged after it is dropped."""
        log_file = str(self.paths.log)
        if os.path.exists(log_file) and os.path.getsize(log_file) > size:
            with open(log_file, "r+b") as f:
                f.truncate(size)

    def log_bytes(self) -> int:
        return os.path.getsize(self.paths.log)

    def write(self, record: Dict[str, Any]) -> None:
        """One line of metrics.jsonl."""
        if self.main:
            self.jsonl.write(record)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()

    def resume_predictions(self) -> None:
        """A resumed run's best validation predictions, as its checkpoint left predictions.jsonl."""
        self.best_records = [r for r in read_jsonl(str(self.paths.predictions)) if r.get("split") == "validation"]

    def predictions(self, records: Optional[List[Dict[str, Any]]], split: str) -> None:
        """predictions.jsonl: the best checkpoint's validation records, then its test records."""
        if records is None:
            return
        if split == "validation":
            self.best_records = [{"split": split, **r} for r in records]
            rows = self.best_records
        else:
            rows = self.best_records + [{"split": split, **r} for r in records]
        if self.main:
            atomic_write_text(str(self.paths.predictions), "".join(json.dumps(r, default=str) + "\n" for r in rows))

    def finish(self, final: Dict[str, Any], config: Any, keep_checkpoints: bool) -> None:
        """metrics.json, the model cards, the loss curve and the summary; checkpoints/ goes unless kept."""
        from frod_cli.console import print_final
        from frod_cli.runs.plots import plot_loss_curve
        from frod_cli.share.card import write_run_cards

        if not self.main:
            return
        self.close()
        atomic_write_json(str(self.paths.metrics), final)
        write_run_cards(self.plan.run_dir, self.plan.final_dir, config=config)  # README.md in merged/, adapter/
        plot_loss_curve(str(self.paths.log), str(self.paths.loss_png),
                        title=f"{config.recipe_name}: {config.method.name} on {final['data']}")
        print_final(final, self.plan.final_dir)
        if not keep_checkpoints:
            shutil.rmtree(os.path.join(self.plan.run_dir, CHECKPOINTS), ignore_errors=True)

    def replace_finished_run(self) -> None:
        """train.overwrite: the finished new run takes the old run's place (every file of this run closed first)."""
        if not (self.main and self.plan.replaces):
            return
        if self.run_log is not None:
            self.run_log.close()
        rd.swap_into_place(self.plan.run_dir, self.plan.final_dir)
        log.info("train.overwrite: %s now holds this run", self.plan.final_dir)
