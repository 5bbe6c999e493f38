"""Training steps as strategies: what one optimizer step does before the optimizer, provided by the task type
(`Task.training_step`). The loop (frod_cli/training/recipe.py) keeps everything around it: the window of
micro-batches, the method's accumulation context, the gradient sync across processes, the finite-loss check,
clipping, the optimizer and scheduler steps, logging, evaluations and checkpoints.

One step of the loop:

    window = the optimizer step's micro-batches (train.grad_accum of them, this process's share)
    window = step.prepare(window)              outside the method's window context: e.g. sampling and scoring
    with method.accumulation(model, len(window)):
        outcome = step.run(window)             forward, loss and backward of each micro-batch
    sync, check outcome, clip, optimizer.step(), scheduler.step()
    step.log_metrics()                          extra per-step figures for metrics.jsonl and the trackers

`loop` is what a strategy may use of the recipe: `model` (as prepared by Accelerate), `unwrapped`, `acc` (the
Accelerator), `method`, `task`, `cfg`, and `micro_batch(j, size)` (the context each micro-batch's forward and
backward run in: the process group's gradient sync is skipped for all but the last micro-batch of a window).
A strategy with state that a resumed run needs (a rollout buffer, a sampling generator) returns it from
`state_dict` and gets it back in `load_state_dict`: it goes into every checkpoint (as tensors and JSON values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch


@dataclass
class StepOutcome:
    """What `run` hands the loop, as tensors on the device (no host sync per micro-batch)."""

    loss_sum: torch.Tensor  # the micro-batches' losses summed (for the logged mean)
    count: torch.Tensor  # how many losses were summed
    nonfinite: torch.Tensor  # how many of them were not finite (the loop stops the run on any)
    bad_value: torch.Tensor  # the last non-finite loss (for the message)
    examples: int  # examples trained on in this process (throughput)


class TrainingStep:
    """The default shape of a strategy; subclasses implement `run`."""

    def __init__(self, task: Any, loop: Any):
        self.task, self.loop = task, loop

    def prepare(self, window: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Work before the gradients, outside the method's accumulation window (no gradient flows here)."""
        return window

    def run(self, window: List[Dict[str, Any]]) -> StepOutcome:
        raise NotImplementedError

    def log_metrics(self) -> Dict[str, float]:
        """Figures of the steps since the last log line (metrics.jsonl, trackers); {}: none beyond the loss."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """A resumed run's strategy state, as `state_dict` gave it at the checkpoint."""


def examples_in(batch: Dict[str, Any]) -> int:
    """The number of examples of a collated batch: the first dimension of its first tensor."""
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    return 0


class SupervisedStep(TrainingStep):
    """Forward, loss, backward for each micro-batch (classification, causal LM, preference pairs: the task's
    `loss` says what a forward is). The loss is divided by the window's size, so the summed gradients are those of
    the window's mean loss."""

    def run(self, window: List[Dict[str, Any]]) -> StepOutcome:
        loop = self.loop
        device = loop.acc.device
        out = StepOutcome(*(torch.zeros((), device=device) for _ in range(4)), examples=0)
        for j, batch in enumerate(window):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with loop.micro_batch(j, len(window)):
                loss = self.task.loss(loop.model, batch)  # the prepared model autocasts (mixed precision)
                value = loss.detach().float().reshape(())
                nonfinite = ~torch.isfinite(value)
                out.nonfinite += nonfinite
                out.bad_value = torch.where(nonfinite, value, out.bad_value)
                loop.acc.backward(loss / len(window))
            out.loss_sum += value
            out.count += 1
            out.examples += examples_in(batch)
        return out
