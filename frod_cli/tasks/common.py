"""Pieces shared by the task types: label spaces, the load pipeline, classification heads, metrics glue."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch

from .. import metrics as metrics_lib
from ..config import TaskConfig, open_map
from .base import Task
from .sources import dedupe, load_raw, make_splits, require_columns

log = logging.getLogger(__name__)
_MISSING = (None, -1, "")


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, bool) and v in _MISSING)


def drop_hidden_test(raw: datasets.DatasetDict, column: str, test_split: Optional[str]) -> datasets.DatasetDict:
    """Drop a test split whose labels are hidden (GLUE uses -1; some sets omit the column): it cannot be
    scored, and `make_splits` then carves a labelled test split out of train instead. Other splits with
    missing labels are left for the checks to refuse: there they are a data error, not a convention."""
    if test_split in raw:
        ds = raw[test_split]
        if column not in ds.column_names or all(is_missing(v) for v in ds.unique(column)):
            log.warning("test split %r has no labels; carving a test split out of train instead", test_split)
            return datasets.DatasetDict({s: d for s, d in raw.items() if s != test_split})
    return raw


def encode_class_labels(
    raw: datasets.DatasetDict, column: str, labels: Optional[Sequence[str]]
) -> Tuple[datasets.DatasetDict, List[str]]:
    """Map every split's `column` to ids 0..K-1 of one label list, stored as a ClassLabel.

    - ClassLabel column: ids go through the feature's names, so `labels` may reorder or be a superset.
    - string column: `labels` gives the order; without it, sorted names from all splits.
    - integer/bool column: with `labels`, values must be 0..K-1; without, sorted distinct values become ids.
    """
    feat = next(iter(raw.values())).features[column]
    labels = list(labels) if labels is not None else None
    present = sorted({v for ds in raw.values() for v in ds.unique(column) if not is_missing(v)})

    def refuse(value: Any, split: str) -> None:
        what = "a missing label" if is_missing(value) else f"label {value!r}"
        raise ValueError(f"split {split!r} column {column!r} holds {what}, not one of task.labels {names}")

    if isinstance(feat, datasets.ClassLabel):
        names = labels or list(feat.names)
        table = {i: names.index(n) for i, n in enumerate(feat.names) if n in names}
        to_id = lambda v: table.get(v)  # noqa: E731
    elif isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
        names = labels or present
        table = {n: i for i, n in enumerate(names)}
        to_id = lambda v: table.get(v)  # noqa: E731
    elif isinstance(feat, datasets.Value) and (feat.dtype.startswith("int") or feat.dtype == "bool"):
        if labels is not None:
            names = labels
            to_id = lambda v: int(v) if v is not None and 0 <= int(v) < len(names) else None  # noqa: E731
        else:
            names = [str(v) for v in present]
            table = {v: i for i, v in enumerate(present)}
            to_id = lambda v: table.get(v)  # noqa: E731
    else:
        raise ValueError(
            f"label column {column!r} has type {feat}; classification needs strings or integers "
            "(set task.regression=true for real-valued targets)"
        )
    if not names:
        raise ValueError(f"label column {column!r} holds no labels")

    out = {}
    for split, ds in raw.items():
        for v in ds.unique(column):
            if to_id(v) is None:
                refuse(v, split)
        feats = ds.features.copy()
        feats[column] = datasets.ClassLabel(names=names)
        out[split] = ds.map(lambda b: {column: [to_id(v) for v in b[column]]}, batched=True, features=feats)
    return datasets.DatasetDict(out), names


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return np.concatenate([to_numpy(t).reshape(-1) for t in x])
    return np.asarray(x)


def model_config(model: torch.nn.Module) -> Any:
    """The HF config behind DDP / PEFT wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)


@dataclass
class LabelledConfig(TaskConfig):
    """Task types that predict a label column and score predictions with evaluate modules (frod_cli/metrics)."""

    label_field: str = "label"
    metrics: List[str] = field(default_factory=lambda: ["accuracy"])  # every evaluation reports these


@dataclass
class ClassificationConfig(LabelledConfig):
    """A classification (or regression) head over the model: seq_cls, image_cls."""

    labels: Optional[List[str]] = None  # class names, in the head's order; inferred from the data when None
    label_aliases: Dict[str, str] = field(default_factory=open_map)  # e.g. ARC's answerKey {"1": "A", ...}
    regression: bool = False  # one real-valued output (e.g. STS-B), MSE loss


class DataTask(Task):
    """The load pipeline every task type shares: raw -> normalise -> check -> labels -> dedupe -> splits."""

    label_column = "label"  # after `normalise`

    def input_columns(self) -> List[str]:
        raise NotImplementedError

    def normalise(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Hook: rewrite a source's schema into the task's (multiple choice does)."""
        return raw

    def prepare_labels(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        return raw

    def stratify_column(self) -> Optional[str]:
        return self.label_column

    def load_data(self) -> datasets.DatasetDict:
        # Only the splits the config names: e.g. GLUE's or PIQA's hidden-label test splits are never read.
        raw = self.normalise(keep_configured_splits(load_raw(self.cfg), self.cfg))
        raw = drop_hidden_test(raw, self.label_column, self.cfg.test_split)
        require_columns(raw, [*self.input_columns(), self.label_column])
        raw = self.prepare_labels(raw)
        if self.cfg.dedupe:
            raw = datasets.DatasetDict({s: dedupe(ds, self.input_columns()) for s, ds in raw.items()})
        return make_splits(raw, self.cfg, self.seed, stratify_by=self.stratify_column())


class LabelledTask(DataTask):
    """A DataTask whose predictions are scored by `task.metrics` (LabelledConfig)."""

    libraries = ("evaluate",)

    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        return metrics_lib.compute(list(self.cfg.metrics), to_numpy(predictions), to_numpy(references), num_labels=self.num_labels)

    def metric_names(self) -> Optional[List[str]]:
        return metrics_lib.names(self.cfg.metrics)

    @property
    def num_labels(self) -> Optional[int]:
        return None


def keep_configured_splits(raw: datasets.DatasetDict, cfg: Any) -> datasets.DatasetDict:
    """The source's splits that `cfg` names (train_split, validation_split, test_split); no others."""
    named = {cfg.train_split, cfg.validation_split, cfg.test_split} - {None}
    if cfg.train_split not in raw:  # let make_splits report the missing train split
        return raw
    return datasets.DatasetDict({s: ds for s, ds in raw.items() if s in named})


class ClassificationTask(LabelledTask):
    """A task whose model has a classification/regression head and returns `.logits` of shape [B, K]."""

    default_modules_to_save = ("classifier", "score")  # BERT/ViT heads, LLaMA-style sequence heads

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        self.label_column = cfg.label_field
        self.labels: Optional[List[str]] = None

    @property
    def num_labels(self) -> Optional[int]:
        return 1 if self.cfg.regression else (len(self.labels) if self.labels else None)

    def stratify_column(self) -> Optional[str]:
        return None if self.cfg.regression else self.label_column

    def prepare_labels(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        if self.cfg.regression:
            out = {}
            for split, ds in raw.items():
                # Only None/NaN: -1.0 is a legitimate target on many scales.
                if any(v is None or v != v for v in ds.unique(self.label_column)):
                    raise ValueError(f"split {split!r} column {self.label_column!r} has missing regression targets")
                out[split] = ds.cast_column(self.label_column, datasets.Value("float32"))
            return datasets.DatasetDict(out)
        aliases = {str(k): str(v) for k, v in (self.cfg.label_aliases or {}).items()}
        if aliases:  # several spellings of one label (ARC's answerKey is "A"-"D" or "1"-"4")
            column = self.label_column
            raw = raw.map(lambda ex: {column: aliases.get(str(ex[column]), ex[column])})
        raw, self.labels = encode_class_labels(raw, self.label_column, self.cfg.labels)
        self._refuse_one_class(raw)
        return raw

    def _refuse_one_class(self, raw: datasets.DatasetDict) -> None:
        """A classifier trained on one class learns nothing and scores 1.0 on data of that class."""
        train = raw.get(self.cfg.train_split)
        if train is None:
            return
        present = train.unique(self.label_column)
        if len(present) < 2:
            shown = ", ".join(repr(self.labels[i]) for i in present) or "none"
            raise ValueError(f"split {self.cfg.train_split!r} column {self.label_column!r} holds {len(present)} class "
                             f"({shown}): a classifier needs examples of at least two classes")

    def model_kwargs(self) -> Dict[str, Any]:
        if self.cfg.regression:
            return {"num_labels": 1, "problem_type": "regression"}
        if self.labels is None:
            if self.cfg.labels is None:
                raise RuntimeError("model_kwargs() needs the label list: call load_data() first or set task.labels")
            self.labels = list(self.cfg.labels)
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {n: i for i, n in enumerate(self.labels)},
            "problem_type": "single_label_classification",
        }

    def label_tensor(self, values: Sequence[Any]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32 if self.cfg.regression else torch.long)

    def model_inputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return batch

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.model_inputs(model, batch)).loss

    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in self.model_inputs(model, batch).items() if k != "labels"}
        logits = model(**inputs).logits
        preds = logits.squeeze(-1).float() if self.cfg.regression else logits.argmax(-1)
        return preds, batch["labels"]
