"""A task type added from outside frod_cli/tasks/: this one file (a config dataclass and a Task, registered
together) plus one YAML naming its schema, then trained end to end by `frod train` (docs/ARCHITECTURE.md,
"Adding a task type", walks through this example). Nothing else in frod changes for it."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from omegaconf import OmegaConf

from frod_cli.config import TaskConfig
from frod_cli.tasks import Task, register_task

from conftest import DEBUG, one_error_line


@dataclass
class SevensConfig(TaskConfig):
    """The type's own keys beside the shared ones (a key of another type, e.g. task.text_fields, is refused)."""

    digits: int = 8  # digits per example
    rows: int = 96  # examples generated per seed (split 3:1:1 into train / validation / test)


@register_task("sevens", config=SevensConfig)
class Sevens(Task):
    """Does a string of digits hold a 7? Two classes, read by a sequence-classification head."""

    auto_class = "AutoModelForSequenceClassification"
    default_modules_to_save = ("classifier",)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from frod_cli import FrodCliError

        super().check_config(cfg)
        if cfg.digits < 1:
            raise FrodCliError(f"task.digits must be at least 1, got {cfg.digits}")

    def load_data(self):
        import datasets

        rng = random.Random(self.seed)
        texts = [" ".join(rng.choice("0123456789") for _ in range(self.cfg.digits)) for _ in range(self.cfg.rows)]
        rows = {"text": texts, "label": [int("7" in t) for t in texts]}
        full = datasets.Dataset.from_dict(rows)
        cut = [0, 3 * len(full) // 5, 4 * len(full) // 5, len(full)]
        return datasets.DatasetDict({s: full.select(range(a, b)) for s, a, b in
                                     zip(("train", "validation", "test"), cut, cut[1:])})

    def model_kwargs(self) -> Dict[str, Any]:
        return {"num_labels": 2, "id2label": {0: "no", 1: "yes"}, "label2id": {"no": 0, "yes": 1}}

    def encode(self, data, preprocessor):
        def tokenize(batch):
            enc = dict(preprocessor(batch["text"], truncation=True, max_length=self.cfg.max_length))
            enc["labels"] = batch["label"]
            return enc

        return data.map(tokenize, batched=True, remove_columns=["text", "label"])

    def collate(self, preprocessor) -> Callable[[list], Dict[str, torch.Tensor]]:
        def collate_fn(features: list) -> Dict[str, torch.Tensor]:
            batch = dict(preprocessor.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                                          return_tensors="pt"))
            batch["labels"] = torch.tensor([f["labels"] for f in features])
            return batch

        return collate_fn

    def metric_names(self) -> List[str]:
        return ["accuracy"]

    def predict(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return model(**self.model_inputs(model, batch)).logits.argmax(-1), batch["labels"]

    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        return {"accuracy": float((torch.as_tensor(predictions) == torch.as_tensor(references)).float().mean())}


TASK_YAML = """\
# frod train task=sevens hydra.searchpath=[file://<this folder's parent>]
defaults:
  - /task/schema@_here_: sevens   # the keys of task.type=sevens (SevensConfig): others are refused
  - _self_

name: sevens
digits: 6
max_length: 16
"""


@pytest.fixture
def search_path(tmp_path):
    (tmp_path / "configs" / "task").mkdir(parents=True)
    (tmp_path / "configs" / "task" / "sevens.yaml").write_text(TASK_YAML)
    return f"hydra.searchpath=[file://{tmp_path / 'configs'}]"


def test_a_task_type_from_outside_trains_end_to_end(tmp_path, search_path, capsys):
    from frod_cli.cli import main, run_verb

    run = tmp_path / "run"
    code, _ = run_verb("train", [*DEBUG, "task=sevens", search_path, "train.max_steps=3", f"hydra.run.dir={run}"])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "sevens" and metrics["objective"] == "accuracy" and metrics["steps"] == 3
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["merge_max_abs_diff"] < 1e-4  # the merge check ran through the type's default `outputs`
    saved = OmegaConf.load(run / ".hydra" / "config.yaml").task
    assert (saved.type, saved.digits) == ("sevens", 6)  # the YAML's value, typed
    # the schema is the type's own: another type's key, and a value its check refuses, are one line each
    assert main(["train", *DEBUG, "task=sevens", search_path, "task.text_fields=[a]",
                 f"hydra.run.dir={tmp_path / 'r2'}"]) == 2
    assert "text_fields" in one_error_line(capsys)
    assert main(["train", *DEBUG, "task=sevens", search_path, "task.digits=0",
                 f"hydra.run.dir={tmp_path / 'r3'}"]) == 2
    assert "task.digits must be at least 1" in one_error_line(capsys)
