"""Sequence classification and regression on one text or a text pair (`task.text_fields`).

Classification (SST-2, CoLA, MNLI, twitter_sentiment) or regression (`task.regression=true`, e.g. STS-B:
one output, MSE loss). With `task.prompt_template` the input is one text rendered from any columns
(tasks/templates.py), e.g. the paper's commonsense protocol: a prompt listing the question and its choices,
classified into the index of the right choice by a sequence-classification head. Tokenized once, truncated to `task.max_length`; padded per batch in `collate`.
Only the splits the config names (train/validation/test_split) are read: a source's other splits, e.g.
GLUE's hidden-label test splits when `test_split` is null or MNLI's test_matched/test_mismatched, are
dropped before the label checks (`common.keep_configured_splits`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import datasets
import torch

from . import templates
from .base import register_task
from .common import ClassificationConfig, ClassificationTask
from .sources import fingerprint, tokenizer_digest


@dataclass
class SequenceClassificationConfig(ClassificationConfig):
    text_fields: List[str] = field(default_factory=lambda: ["text"])  # 1 or 2 (paired) text columns
    # One text rendered from any columns instead (tasks/templates.py), e.g. "Question: {question}\nAnswer:"
    prompt_template: Optional[str] = None


@register_task("seq_cls", config=SequenceClassificationConfig)
class SequenceClassification(ClassificationTask):
    auto_class = "AutoModelForSequenceClassification"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from frod_cli import FrodCliError

        super().check_config(cfg)
        if cfg.prompt_template is None and not 1 <= len(cfg.text_fields) <= 2:
            raise FrodCliError(f"task.text_fields takes one column or a pair, got {list(cfg.text_fields)}")

    def input_columns(self) -> List[str]:
        if self.cfg.prompt_template is not None:
            return templates.fields(self.cfg.prompt_template)
        return list(self.cfg.text_fields)

    def texts(self, batch: Dict[str, list]) -> List[List[str]]:
        """The tokenizer's inputs: one list per text column (or the rendered prompts)."""
        template = self.cfg.prompt_template
        if template is not None:
            n = len(next(iter(batch.values())))
            rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
            return [[templates.render(template, r, "task.prompt_template") for r in rows]]
        return [["" if t is None else str(t) for t in batch[f]] for f in self.cfg.text_fields]

    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        label = self.label_column

        def tokenize(batch: Dict[str, list]) -> Dict[str, list]:
            texts = self.texts(batch)
            enc = preprocessor(*texts, truncation=True, max_length=self.cfg.max_length)
            enc["labels"] = batch[label]
            return dict(enc)

        settings = (tokenizer_digest(preprocessor), self.cfg.max_length, list(self.cfg.text_fields),
                    self.cfg.prompt_template, label)
        return datasets.DatasetDict({
            split: ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                          new_fingerprint=fingerprint(ds, "seq_cls", settings, code=("seq_cls.py", "templates.py")))
            for split, ds in data.items()})

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        def collate_fn(features: list) -> Dict[str, torch.Tensor]:
            batch = preprocessor.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
            batch = dict(batch)
            batch["labels"] = self.label_tensor([f["labels"] for f in features])
            return batch

        return collate_fn
