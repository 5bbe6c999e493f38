"""The run's figures: throughput over training time only (evaluations and checkpoints set aside), peak and current
memory (frod_cli/memory.py), one metrics.jsonl line per log step, and metrics.json's final record. `loop` is the
training recipe (frod_cli/training/recipe.py)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, Optional

import torch

from frod_cli.memory import PeakMemory
from frod_cli.share.card import describe_hardware
from frod_cli.tasks.sources import describe_source
from frod_cli.training import streaming as TS


class LoopMeter:
    """Time and examples of the training loop. The loop's time spent in evaluations and checkpoints is set aside,
    so samples_per_s is the training's own rate (a progress bar's), in metrics.jsonl and metrics.json alike."""

    def __init__(self) -> None:
        self.t_start = time.time()
        self.samples_window = self.samples_trained = 0  # examples really trained on (short batches counted)
        self.aside = {"evaluation": 0.0, "checkpoint": 0.0}

    def start(self, device: torch.device) -> None:
        """The first training step is next: the peak memory and the clocks count from here."""
        self.memory = PeakMemory(device)
        self.t_train = self.t_window = time.time()
        self.aside_at_window = 0.0

    def count(self, examples: int) -> None:
        self.samples_window += examples
        self.samples_trained += examples

    @contextlib.contextmanager
    def set_aside(self, kind: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.aside[kind] += time.time() - t0

    def window_rate(self) -> float:
        """Examples per second of training since the last call (the log step's samples_per_s); starts a window."""
        aside = sum(self.aside.values())
        rate = self.samples_window / max(time.time() - self.t_window - (aside - self.aside_at_window), 1e-9)
        self.t_window, self.samples_window, self.aside_at_window = time.time(), 0, aside
        return rate

    def train_seconds(self) -> float:
        return time.time() - self.t_train - sum(self.aside.values())


def training_record(loop: Any, mean_loss: float) -> Dict[str, Any]:
    """One log step's line of metrics.jsonl (the strategy's own figures added by the loop)."""
    st, meter = loop.state, loop.meter
    elapsed = time.time() - meter.t_train
    return {"step": st.step, "epoch": round(st.epoch + st.step_in_epoch / loop.steps_per_epoch, 4),
            "loss": mean_loss, "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(loop.optimizer.param_groups)},
            "samples_per_s": meter.window_rate(), "elapsed_s": elapsed,
            "eta_s": elapsed / max(st.step - loop.first_step, 1) * (loop.total_steps - st.step),
            "peak_memory_mb": meter.memory.peak_mb(), "current_memory_mb": meter.memory.current_mb()}


def final_metrics(loop: Any, results: Dict[str, Any], test_majority: Optional[float],
                  merge_diff: Optional[float]) -> Dict[str, Any]:
    """metrics.json."""
    cfg, st, meter, acc = loop.cfg, loop.state, loop.meter, loop.acc
    return {
        "recipe": cfg.recipe_name, "model": cfg.model.name_or_path, "task": cfg.task.name,
        "data": describe_source(cfg.task),
        "method": cfg.method.name, "objective": cfg.task.objective, "objective_mode": cfg.task.objective_mode,
        "objective_value": st.best, "best_step": st.best_step, **results, **loop.counts,
        "steps": st.step, "epochs": round(st.step / loop.steps_per_epoch, 4),
        "samples_per_s": meter.samples_trained / max(loop.train_s, 1e-9),
        "train_time_s": loop.train_s, "evaluation_time_s": meter.aside["evaluation"],
        "checkpoint_time_s": meter.aside["checkpoint"], "adapt_time_s": loop.adapt_s,
        "wall_time_s": time.time() - meter.t_start, "peak_memory_mb": loop.peak_memory_mb,
        "peak_memory_method": f"{meter.memory.method}, from the first training step to the last",
        "merge_max_abs_diff": merge_diff,
        "test_majority_class_accuracy": test_majority, "num_processes": acc.num_processes,
        "rank_fingerprints": loop.fingerprints, "resumed_from": loop.resume_from,
        "mixed_precision": loop.mixed, "method_details": loop.method.describe(),
        "task_preparation": loop.task_prep, "data_counts": data_counts(loop),
        "hardware": describe_hardware(acc.device, acc.num_processes),
        **loop.precision.record(),  # compute_dtype; on a CPU run its capability and what it emulates
    }


def data_counts(loop: Any) -> Optional[Dict[str, Any]]:
    """What the task read (per split and per source: rows, malformed, truncated, dropped, training examples); a
    streamed run adds what its stream gave (training/streaming.py)."""
    counts = loop.task.data_stats()
    if loop.streaming and counts is not None:
        counts["stream"] = TS.summary(loop.state.stream, list(getattr(loop.train_set, "sources", [])))
    return counts
