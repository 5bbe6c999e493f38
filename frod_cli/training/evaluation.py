"""Evaluation: the metrics of a split (the task's own evaluation, e.g. generation, or batched
predictions gathered over processes), the majority-class baseline, and the merge check."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from frod_cli import FrodCliError
from frod_cli.runs import atomic_dir
from frod_cli.training.builders import make_loader, to_device


@dataclass
class SplitResult:
    metrics: Dict[str, float]
    references: Any = None  # the default path's references (majority-class accuracy)
    records: Optional[List[Dict[str, Any]]] = None  # the task's per-example predictions (predictions.jsonl)


def _predict_split(model, loader, task, accelerator) -> Tuple[Dict[str, float], Any]:
    preds: List[torch.Tensor] = []
    refs: List[torch.Tensor] = []
    for batch in loader:
        p, r = task.predict(model, batch)
        p, r = accelerator.gather_for_metrics((p.contiguous(), r.contiguous()))
        preds.append(p.detach().float().cpu() if p.is_floating_point() else p.detach().cpu())
        refs.append(r.detach().float().cpu() if r.is_floating_point() else r.detach().cpu())
    P, R = torch.cat(preds).numpy(), torch.cat(refs).numpy()
    return {k: float(v) for k, v in task.compute_metrics(P, R).items()}, R


class Evaluator:
    """Evaluates the encoded splits of one task on every process; loaders are built (and prepared by
    Accelerate, which shards them) once per split."""

    def __init__(self, task: Any, accelerator: Any, encoded: Any, collate: Any, batch_size: int, num_workers: int = 0,
                 method: Any = None):
        self.task, self.acc, self.encoded, self.collate = task, accelerator, encoded, collate
        self.method = method  # its evaluation_context is open around each split (FRoD: W + dW held for it)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self._loaders: Dict[str, Any] = {}

    def has(self, split: str) -> bool:
        return split in self.encoded

    def loader(self, split: str):
        if split not in self._loaders:
            loader = make_loader(self.encoded[split], self.batch_size, self.collate, False, 0, self.num_workers)
            self._loaders[split] = self.acc.prepare(loader)
        return self._loaders[split]

    def split(self, model: torch.nn.Module, split: str) -> SplitResult:
        if len(self.encoded[split]) == 0:
            raise FrodCliError(f"the {split!r} split is empty: nothing to evaluate")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _evaluation_context(self.method, model):
                own = self.task.evaluate(model, self.encoded[split], self.loader(split), self.acc)
                if own is not None:
                    metrics, records = own
                    return SplitResult({k: float(v) for k, v in metrics.items()}, None, records)
                metrics, refs = _predict_split(model, self.loader(split), self.task, self.acc)
                return SplitResult(metrics, refs, None)
        finally:
            if was_training:
                model.train()


def _evaluation_context(method: Any, model: torch.nn.Module):
    return contextlib.nullcontext() if method is None else method.evaluation_context(model)


def majority_accuracy(refs) -> Optional[float]:
    """Accuracy of always answering the most frequent class (None for regression or no references)."""
    if refs is None:
        return None
    t = torch.as_tensor(refs)
    if t.is_floating_point() or t.dim() != 1 or t.numel() == 0:
        return None
    return float(torch.bincount(t.long()).max().item() / t.numel())


# ---- merge check ------------------------------------------------------------------------------------
def model_outputs(model, batch, task=None) -> torch.Tensor:
    """The logits (or first output) of a model on a batch, in float32: the task's `outputs` (a multiple-choice
    task's choice scores), or the plain model's on a batch of model inputs."""
    if task is not None:
        return task.outputs(model, batch)
    out = model(**batch)
    t = getattr(out, "logits", None)
    if t is None:
        t = out[0] if isinstance(out, (tuple, list)) else out
    return t.float()


def check_batch(encoded_split: Any, collate: Any, size: int, device: torch.device) -> Dict[str, Any]:
    """The first `size` examples of a split, as one batch on `device` (the merge check's input)."""
    batch = next(iter(make_loader(encoded_split, int(size), collate)))
    return to_device(batch, device)


def merge_and_check(method, model, batch, task=None) -> Tuple[Any, float]:
    """Merge the adaptation; return (plain model, largest |merged - unmerged| output on `batch`)."""
    model.eval()
    with torch.no_grad():
        before = model_outputs(model, batch, task)
    merged = method.merge(model)
    merged.eval()
    with torch.no_grad():
        after = model_outputs(merged, batch, task)
    return merged, float((after - before).abs().max().item())


def save_merged(merged_model, preprocessor, directory: str, dtype: Optional[torch.dtype] = None) -> None:
    """merged/: a plain transformers model (+ its tokenizer or image processor), written atomically."""
    if dtype is not None:
        merged_model = merged_model.to(dtype)

    def write(tmp: str) -> None:
        merged_model.save_pretrained(tmp)
        save_preprocessor(preprocessor, merged_model, tmp)

    atomic_dir(directory, write)


CAUSAL_INPUTS = ["input_ids", "attention_mask"]


def save_preprocessor(preprocessor: Any, model: Any, directory: str) -> None:
    """The tokenizer or image processor beside a saved model. A causal LM's tokenizer is saved without
    `token_type_ids` among its model inputs (BERT's tokenizer, which tiny:llama uses, returns them), so that
    `model.generate(**tokenizer(text, return_tensors="pt"))` works on what was saved."""
    if preprocessor is None or not hasattr(preprocessor, "save_pretrained"):
        return
    names = getattr(preprocessor, "model_input_names", None)
    if names and "token_type_ids" in names and model.can_generate():
        preprocessor.model_input_names = [n for n in names if n != "token_type_ids"]
        preprocessor.init_kwargs["model_input_names"] = list(preprocessor.model_input_names)
    preprocessor.save_pretrained(directory)
