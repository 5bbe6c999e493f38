"""Sequence classification and regression on one text or a text pair (`task.text_fields`).

Classification (SST-2, CoLA, MNLI, twitter_sentiment) or regression (`task.regression=true`, e.g. STS-B:
one output, MSE loss). Tokenized once, truncated to `task.max_length`; padded per batch in `collate`.
Only the splits the config names (train/validation/test_split) are read: a source's other splits, e.g.
GLUE's hidden-label test splits when `test_split` is null or MNLI's test_matched/test_mismatched, are
dropped before the label checks (`common.keep_configured_splits`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import datasets
import torch

from .base import register_task
from .common import ClassificationTask


@register_task("seq_cls")
class SequenceClassification(ClassificationTask):
    auto_class = "AutoModelForSequenceClassification"
    modality = "text"

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        if not 1 <= len(cfg.text_fields) <= 2:
            raise ValueError(f"task.text_fields takes one column or a pair, got {list(cfg.text_fields)}")

    def input_columns(self) -> List[str]:
        return list(self.cfg.text_fields)

    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        fields, label = list(self.cfg.text_fields), self.label_column

        def tokenize(batch: Dict[str, list]) -> Dict[str, list]:
            texts = [["" if t is None else str(t) for t in batch[f]] for f in fields]
            enc = preprocessor(*texts, truncation=True, max_length=self.cfg.max_length)
            enc["labels"] = batch[label]
            return dict(enc)

        return data.map(tokenize, batched=True, remove_columns=next(iter(data.values())).column_names)

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        def collate_fn(features: list) -> Dict[str, torch.Tensor]:
            batch = preprocessor.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
            batch = dict(batch)
            batch["labels"] = self.label_tensor([f["labels"] for f in features])
            return batch

        return collate_fn
