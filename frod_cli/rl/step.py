"""One GRPO step's pieces, independent of the training loop that calls them: `collect` (rollout, rewards,
advantages, and the log-probabilities the loss compares with), `batch_loss` (the loss of some of the rollout's
completions, for one backward) and `rollout_metrics`. The loop owns the optimizer step, clipping, schedule,
evaluations and checkpoints; a rollout with `num_iterations` passes serves that many optimizer steps, each pass's
micro-batches calling `batch_loss` (pass 0 compares with the policy itself: rho = 1 exactly; later passes with the
rollout policy's stored log-probabilities). `Collected.state_dict` / `from_state` carry a rollout across a
checkpoint (tensors and JSON values: no pickle), so a run resumed between two passes over one rollout trains on
the same completions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from frod_cli.rl import loss as L
from frod_cli.rl import rollout as R


@dataclass
class GrpoSettings:
    """What a GRPO step needs to know (the task's typed config carries it)."""

    group_size: int = 8  # G: completions per prompt
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo (frod_cli/rl/loss.py)
    beta: float = 0.0  # KL penalty against the starting model (Method.reference_context)
    epsilon_low: float = L.EPSILON_LOW
    epsilon_high: Optional[float] = None  # None: the variant's (dapo 0.28, else 0.2)
    num_iterations: int = 1  # optimization passes (optimizer steps) over one rollout
    max_completion_length: int = 32  # new tokens per completion (L_max of dr_grpo)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    groups_per_call: int = 1  # groups per generate call (frod_cli/rl/rollout.py: reproducibility vs speed)
    logp_batch_size: int = 64  # completions per no-grad forward (rollout policy, reference)

    def sampling(self) -> Dict[str, Any]:
        return {"max_new_tokens": int(self.max_completion_length), "temperature": float(self.temperature),
                "top_p": float(self.top_p), "top_k": int(self.top_k)}


@dataclass
class Collected:
    """A rollout and everything the loss needs of it; rows in the rollout's order (group-major)."""

    rollout: R.Rollout
    advantages: torch.Tensor  # [N]
    old_logps: Optional[torch.Tensor]  # [N, C] rollout policy (num_iterations > 1), else None
    ref_logps: Optional[torch.Tensor]  # [N, C] starting model (beta > 0), else None
    scores: Any  # frod_cli.tasks.rewards.Scores of the N completions (None once restored from a checkpoint)
    # what dapo's token mean divides by: this rollout's completion tokens; over P processes, every process's
    # tokens / P (DDP averages the P gradients: the mean over every token of the global batch)
    num_tokens: float = 0.0

    def lengths_and_ended(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.rollout.lengths(), dtype=torch.float32),
                torch.tensor(self.rollout.ended, dtype=torch.float32))

    def state_dict(self, prefix: str) -> Dict[str, Any]:
        """Tensors and JSON values (frod_cli/training/checkpoint.py stores them without pickle)."""
        ro = self.rollout
        out: Dict[str, Any] = {f"{prefix}rollout": {"prompts": ro.prompts, "completions": ro.completions,
                                                     "ended": ro.ended, "group_size": ro.group_size, "seeds": ro.seeds},
                               f"{prefix}num_tokens": float(self.num_tokens), f"{prefix}advantages": self.advantages}
        for name in ("old_logps", "ref_logps"):
            if getattr(self, name) is not None:
                out[prefix + name] = getattr(self, name)
        return out

    @classmethod
    def from_state(cls, state: Dict[str, Any], prefix: str, device: Any) -> "Collected":
        ro = state[f"{prefix}rollout"]
        rollout = R.Rollout([list(p) for p in ro["prompts"]], [list(c) for c in ro["completions"]],
                            [bool(e) for e in ro["ended"]], int(ro["group_size"]), [int(s) for s in ro["seeds"]])
        on = {k: state[prefix + k].to(device) if prefix + k in state else None
              for k in ("advantages", "old_logps", "ref_logps")}
        return cls(rollout, on["advantages"], on["old_logps"], on["ref_logps"], None,
                   float(state[f"{prefix}num_tokens"]))


def _no_grad_rows(model: Any, rollout: R.Rollout, tokenizer: Any, device: Any, chunk: int, context: Any,
                  temperature: float) -> torch.Tensor:
    """Per-token log-probabilities of every completion without gradient, `chunk` rows per forward, [N, C]."""
    n, width = len(rollout.completions), max(rollout.lengths())
    out = torch.zeros((n, width), dtype=torch.float32, device=device)
    with context:
        for start in range(0, n, chunk):
            rows = list(range(start, min(n, start + chunk)))
            lp = R.no_grad_logps(model, R.rollout_batch(rollout, tokenizer, device, rows), temperature=temperature)
            out[start : start + len(rows), : lp.shape[1]] = lp
    return out


def collect(model: Any, method: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], reward_prompts: Sequence[Any],
            columns: Dict[str, Sequence[Any]], rewards: Any, settings: GrpoSettings, *, seed: int, step: int,
            first_group: int = 0, group_ids: Optional[Sequence[int]] = None, chat: bool = False) -> Collected:
    """Sample G completions of each prompt (token ids) with `model` (unwrapped) inside
    method.evaluation_context, score them with `rewards` (a frod_cli.tasks.rewards.RewardSet: it receives
    `reward_prompts` and `columns`, one value per group, repeated over the group's completions, plus
    completion_ids), and compute the advantages and, as the settings need them, the rollout policy's and the
    reference's log-probabilities."""
    G, device = int(settings.group_size), next(model.parameters()).device
    with method.evaluation_context(model):
        rollout = R.sample_groups(model, tokenizer, prompts, G, seed=seed, step=step, first_group=first_group,
                                  group_ids=group_ids, groups_per_call=settings.groups_per_call,
                                  **settings.sampling())
        old = None
        if settings.num_iterations > 1:
            old = _no_grad_rows(model, rollout, tokenizer, device, settings.logp_batch_size, contextlib.nullcontext(),
                                settings.temperature)
    ref = None
    if settings.beta > 0:
        ref = _no_grad_rows(model, rollout, tokenizer, device, settings.logp_batch_size,
                            method.reference_context(model), settings.temperature)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completions]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    repeated = {k: [v for v in values for _ in range(G)] for k, values in columns.items()}
    repeated["completion_ids"] = rollout.completions
    scores = rewards.score([p for p in reward_prompts for _ in range(G)], completions, repeated)
    variant = L.variant(settings.loss_type)
    advantages = L.group_advantages(scores.total, G, variant.scale_by_std).to(device)
    return Collected(rollout, advantages, old, ref, scores, float(sum(rollout.lengths())))


def rollout_metrics(scores: Any, lengths: torch.Tensor, ended: torch.Tensor, group_size: int) -> Dict[str, float]:
    """A rollout's figures: each reward's and the total's mean and std, groups_all_equal (Scores.summary), and
    the completion lengths in tokens (EOS included): mean, max, and the share cut at the limit (no EOS)."""
    return {**scores.summary(group_size), "completion_length/mean": float(lengths.mean()),
            "completion_length/max": float(lengths.max()), "completion_length/cut": float(1.0 - ended.mean())}


def batch_loss(model: Any, data: Collected, tokenizer: Any, rows: Sequence[int], settings: GrpoSettings,
               iteration: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss of the completions `rows` of `data` in pass `iteration` (with gradient through `model`, which may
    be the wrapped one), normalized by the whole rollout's counts so that the micro-batches of a pass add up
    to the pass's loss (frod_cli/rl/loss.py)."""
    device = data.advantages.device
    batch = R.rollout_batch(data.rollout, tokenizer, device, rows)
    logp = R.token_logps(model, batch, settings.temperature)
    width, index = logp.shape[1], torch.as_tensor(list(rows), device=device)
    old = None if iteration == 0 or data.old_logps is None else data.old_logps[index, :width]
    ref = None if data.ref_logps is None else data.ref_logps[index, :width]
    return L.policy_loss(logp, data.advantages[index], batch["completion_mask"], loss_type=settings.loss_type,
                         old_logp=old, ref_logp=ref, beta=float(settings.beta),
                         epsilon_low=float(settings.epsilon_low), epsilon_high=settings.epsilon_high,
                         max_completion_length=int(settings.max_completion_length),
                         num_sequences=len(data.rollout.completions), num_tokens=data.num_tokens)
