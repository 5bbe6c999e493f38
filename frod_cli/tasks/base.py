"""The task protocol: what the training loop and `frod eval` may ask of a task.

A task type is one file in this package that subclasses `Task` and registers itself with
`@register_task("name")`; its YAML lives in `recipes/task/`. The loop never looks inside a batch:
it calls `loss`, `predict` and `compute_metrics`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

TASKS: Dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task type {name!r} registered twice")
        cls.type_name = name
        TASKS[name] = cls
        return cls

    return deco


class Task(ABC):
    """One task type. `cfg` is a `frod_cli.config.TaskConfig` (or an OmegaConf node of that schema)."""

    type_name: str = ""
    # Name of the transformers Auto class for this task's head, e.g. "AutoModelForSequenceClassification".
    auto_class: str = ""
    # Names of the head modules a PEFT-style method must keep trainable and save (e.g. ["classifier"]).
    default_modules_to_save: Tuple[str, ...] = ()
    # What a recipe gets when it switches to this task type (task.type=...) without naming them itself.
    defaults: Dict[str, Any] = {"objective": "accuracy", "objective_mode": "max", "metrics": ["accuracy"]}
    # task.<key>s only this type reads: set on the command line for another type, they are refused, not ignored.
    own_keys: Tuple[str, ...] = ()

    def __init__(self, cfg: Any, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    @abstractmethod
    def load_data(self) -> "datasets.DatasetDict":  # noqa: F821
        """Raw splits `train`, `validation` and (if any) `test`, deterministic for a seed.

        Missing validation/test splits are carved out of train, stratified. Sets the label list."""

    @abstractmethod
    def model_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for the model's config: num_labels, id2label, label2id, problem_type.
        Call after `load_data`."""

    @abstractmethod
    def encode(self, data: "datasets.DatasetDict", preprocessor: Any) -> "datasets.DatasetDict":  # noqa: F821
        """Tokenize / transform every split into model inputs (columns the collator understands)."""

    @abstractmethod
    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        """A collate_fn producing a dict of tensors, including the labels."""

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def metric_names(self) -> Optional[List[str]]:
        """The names of the metrics an evaluation reports (task.objective must be one of them), or None when
        the task cannot tell before it evaluates."""
        return None

    @abstractmethod
    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(predictions, references) for one batch, on the batch's device; called under no_grad."""

    def evaluate(self, model: torch.nn.Module, dataset: Any, loader: Any,
                 accelerator: Any) -> Optional[Tuple[Dict[str, float], Optional[List[Dict[str, Any]]]]]:
        """A task's own evaluation of one encoded split (e.g. loss plus generation), or None for the
        default (batched `predict`, gathered over processes, then `compute_metrics`). `loader` is the
        split's batches in order, prepared by Accelerate (sharded over processes); `dataset` the split
        itself, for what is not batched (generation). Returns
        (metrics, prediction records or None); records are written to predictions.jsonl for the best
        checkpoint. Called under no_grad with the model in eval mode, on every process."""
        return None

    def prepare_training(self, model: torch.nn.Module, encoded: Any, accelerator: Any, run_dir: str,
                         batch_size: int, resuming: bool) -> Optional[Dict[str, Any]]:
        """A pass over the data with the starting model, once per run (preference: the reference
        log-probabilities). The training recipe calls it on every process after the model is adapted and
        prepared and before a resumed run's values are restored, so `model` is the model before its first
        step for every method. It may add columns to the encoded splits (in place: same rows, same order),
        and read files a resumed run left in run_dir, but writes nothing there: `store_prepared` does, once
        the run is accepted. Returns what metrics.json records as `task_preparation` (None: nothing)."""
        return None

    def store_prepared(self, run_dir: str) -> None:
        """Main process, once the run is accepted: write what `prepare_training` made into the run directory
        (atomically)."""

    def prepare_evaluation(self, encoded: Any, run_dir: str) -> None:
        """`frod eval` of a run directory: read back what `store_prepared` wrote (in place, as above)."""

    @abstractmethod
    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        """Metrics from all predictions of a split, through the evaluate modules in frod_cli/metrics."""
