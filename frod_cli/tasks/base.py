"""The task protocol: what the training loop, `frod eval` and the merge check may ask of a task.

A task type is one file in this package: a config dataclass (a subclass of `frod_cli.config.TaskConfig`; its
fields are the `task.*` keys the type reads) and a `Task` subclass, registered together with
`@register_task("name", config=TheConfig)`; plus a YAML in `recipes/task/` whose defaults name the schema
(`- /task/schema@_here_: <name>`). Every module of this package is imported on first use (`discover`), as methods
are. Each config is stored in Hydra's ConfigStore as `task/schema/<name>`, so a key of another task type is
refused when the config is composed, and `task.type=<name>` on the command line switches the schema
(frod_cli/commands/train.py). Every hook below is declared here with its default: the loop never probes a task
for a method it might have.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from frod_cli.config import TaskConfig

TASKS: Dict[str, type] = {}
TASK_CONFIGS: Dict[str, type] = {}


def register_task(name: str, config: type = TaskConfig) -> Callable[[type], type]:
    """Register a Task subclass under `name` with its config dataclass (a TaskConfig subclass)."""
    if not (isinstance(config, type) and issubclass(config, TaskConfig)):
        raise TypeError(f"task type {name!r}: its config must subclass frod_cli.config.TaskConfig")

    def deco(cls: type) -> type:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task type {name!r} registered twice")
        cls.type_name = name
        cls.config_class = config
        TASKS[name] = cls
        TASK_CONFIGS[name] = config
        return cls

    return deco


def schema_defaults(config: type) -> Dict[str, Any]:
    """The defaults a config dataclass gives its fields (the factories called): what `task.type=<type>` brings."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


class Task(ABC):
    """One task type. `cfg` is the type's config (an OmegaConf node of `config_class`)."""

    type_name: str = ""
    config_class: type = TaskConfig
    # Name of the transformers Auto class for this task's head, e.g. "AutoModelForSequenceClassification".
    auto_class: str = ""
    # Which preprocessor frod_cli.models builds: "text" (a tokenizer) or "image" (an image processor).
    modality: str = "text"
    # Names of the head modules a PEFT-style method must keep trainable and save (e.g. ["classifier"]).
    default_modules_to_save: Tuple[str, ...] = ()
    # Metrics where lower is better: a task.objective among them must have objective_mode=min.
    lower_is_better: Tuple[str, ...] = ()
    # Libraries it scores with, imported with the others before a run's clock starts (`evaluate`, for the metric
    # modules of frod_cli/metrics: about 2.5 s a process, since it imports transformers' pipelines)
    libraries: Tuple[str, ...] = ()

    def __init__(self, cfg: Any, seed: int = 0):
        type(self).check_config(cfg)  # a task exists only with keys its type can use
        self.cfg = cfg
        self.seed = seed
        self.check_objective()

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, in one line and before any data or model is read, values the schema's types admit but this type
        cannot use (the one place each key is checked). Subclasses extend it."""
        from frod_cli import FrodCliError

        if int(cfg.max_length) < 1:
            raise FrodCliError(f"task.max_length must be at least 1 token, got {cfg.max_length}")
        if cfg.objective_mode not in ("max", "min"):
            raise FrodCliError(f"task.objective_mode must be max or min, got {cfg.objective_mode!r}")

    def check_objective(self) -> None:
        """task.objective must be a metric this task reports, in its direction: found now, not at the first
        evaluation (the one place the objective is checked)."""
        from frod_cli import FrodCliError

        cfg, names = self.cfg, self.metric_names()
        default = schema_defaults(self.config_class).get("objective")
        if names and cfg.objective not in names and cfg.objective == default and "metrics" in cfg:
            # The type's default objective, left as it was, with task.metrics that do not report it (a regression
            # with metrics=[pearson, spearmanr]): the first of the user's metrics is the objective, said in the log.
            import logging

            cfg.objective = names[0]
            cfg.objective_mode = "min" if names[0] in self.lower_is_better else "max"
            logging.getLogger("frod").info("task.objective: %s (the first of task.metrics; the default %s is not "
                                           "among them)", cfg.objective, default)
        if names is not None and cfg.objective not in names:
            more = " or add it to task.metrics" if "metrics" in cfg else ""
            raise FrodCliError(f"task.objective {cfg.objective!r} is not among the metrics this task reports "
                               f"({', '.join(names)}; it is not a {self.type_name} metric): set task.objective to one "
                               f"of them{more}")
        if cfg.objective in self.lower_is_better and cfg.objective_mode != "min":
            raise FrodCliError(f"task.objective={cfg.objective} is minimised: set task.objective_mode=min")

    # ---- data ----------------------------------------------------------------------------------------
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

    @property
    def streaming(self) -> bool:
        """Whether the training split is read while training (a stream has no length: train.max_steps is needed)."""
        return False

    def data_stats(self) -> Optional[Dict[str, Any]]:
        """What reading the data found (rows, malformed, truncated, per source), for metrics.json's `data_counts`;
        None: nothing to report."""
        return None

    # ---- the forward passes ------------------------------------------------------------------------
    def model_inputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The model's inputs from a batch, labels left out: what the merge check and the metrics feed it."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def outputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """What the merge check compares between the merged and the adapted model (and exports with their source):
        the logits of the batch, in float32 (multiple choice: its choice scores)."""
        out = model(**self.model_inputs(model, batch))
        t = getattr(out, "logits", None)
        if t is None:
            t = out[0] if isinstance(out, (tuple, list)) else out
        return t.float()

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def training_step(self, loop: Any) -> Any:
        """The strategy that turns one optimizer step's micro-batches into gradients (frod_cli/tasks/steps.py):
        forward, loss, backward by default; a rollout-based type samples and scores first. `loop` is the training
        recipe (what a strategy may use of it: frod_cli/tasks/steps.py)."""
        from .steps import SupervisedStep

        return SupervisedStep(self, loop)

    # ---- evaluation ----------------------------------------------------------------------------------
    def metric_names(self) -> Optional[List[str]]:
        """The names of the metrics an evaluation reports (task.objective must be one of them), or None when
        the task cannot tell before it evaluates."""
        return None

    @abstractmethod
    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(predictions, references) for one batch, on the batch's device; called under no_grad."""

    @abstractmethod
    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        """Metrics from all predictions of a split, through the evaluate modules in frod_cli/metrics."""

    def evaluate(self, model: torch.nn.Module, dataset: Any, loader: Any,
                 accelerator: Any) -> Optional[Tuple[Dict[str, float], Optional[List[Dict[str, Any]]]]]:
        """A task's own evaluation of one encoded split (e.g. loss plus generation), or None for the
        default (batched `predict`, gathered over processes, then `compute_metrics`). `loader` is the
        split's batches in order, prepared by Accelerate (sharded over processes); `dataset` the split
        itself, for what is not batched (generation). Returns
        (metrics, prediction records or None); records are written to predictions.jsonl for the best
        checkpoint. Called under no_grad with the model in eval mode, on every process."""
        return None

    # ---- a pass with the starting model (preference: the reference log-probabilities) -----------------
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
