"""Rollouts: G completions per prompt sampled from the current policy, and the per-token log-probabilities the
loss (frod_cli/rl/loss.py) compares.

Sampling is reproducible by construction: the completions of a group come from one `generate` call seeded with
`sampling_seed(seed, step, group)`, a function of the run's seed, the optimizer step and the group's index in the
step's global batch (counted over every process), drawn inside `sampling_rng` (the device's RNG forked around the
call and put back after). So a group's completions do not depend on which process samples it, on what other
groups are sampled, or on anything else having consumed random numbers (dropout, the data order): a run resumed
at step k samples what the uninterrupted run sampled, and N processes sample what one process does at the same
global batch, with no generator state to save beyond the step TrainState already holds. The price: one generate
call per `groups_per_call` groups (default 1: G rows per call), where a single call over every group of a
process would fill an accelerator better.

The rollout runs inside `method.evaluation_context(model)` (the caller opens it: FRoD holds W + dW for the
rollout's calls and frees it after). Log-probabilities come from one forward over prompt + completion in the
layout `completion_batch` builds (left-padded prompts, right-padded completions, positions counted from each
row's first real token, as generate counts them), only the completion positions' logits computed
(`logits_to_keep`), divided by the sampling temperature (the distribution the tokens were drawn from).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from frod_cli.decoding import pad_id_of, sample_ids


def sampling_seed(seed: int, step: int, group: int) -> int:
    """The seed of one group's sampling: a 63-bit integer mixed from (seed, step, group) by numpy's SeedSequence
    (nearby triples give unrelated seeds)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(group)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@contextlib.contextmanager
def sampling_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Inside: the RNG of `device` (and the CPU's) seeded with `seed`; outside, both as they were before."""
    device = torch.device(device)
    accelerator = device.type not in ("cpu", "meta")
    module = torch.get_device_module(device.type) if accelerator else None
    devices = [device.index if device.index is not None else module.current_device()] if accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator else "cuda"):
        torch.default_generator.manual_seed(int(seed))
        if accelerator:
            with module.device(devices[0]):
                module.manual_seed(int(seed))
        yield


@dataclass
class Rollout:
    """The completions of a batch of groups: row i*G + j is completion j of prompt i."""

    prompts: List[List[int]]  # one per group
    completions: List[List[int]]  # N = groups x G, each ending with EOS unless cut at the limit
    ended: List[bool]  # completion ended with EOS (False: cut at max_new_tokens)
    group_size: int
    seeds: List[int] = field(default_factory=list)  # the seed each generate call drew with

    def prompt_of_row(self) -> List[List[int]]:
        return [p for p in self.prompts for _ in range(self.group_size)]

    def lengths(self) -> List[int]:
        return [len(c) for c in self.completions]


def sample_groups(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], group_size: int, *, seed: int,
                  step: int, first_group: int = 0, groups_per_call: int = 1, group_ids: Optional[Sequence[int]] = None,
                  **settings: Any) -> Rollout:
    """G = `group_size` completions of each prompt (token ids), sampled (do_sample=True and `settings`, as in
    frod_cli.decoding.generation_config) from `model` as it is. Group k of this call is identified by
    `group_ids[k]` (e.g. its row of the data set), else by `first_group + k` (its place in the step's global
    batch); each generate call covers `groups_per_call` groups and draws with the seed of its first group (module
    docstring)."""
    device = next(model.parameters()).device
    out = Rollout([list(map(int, p)) for p in prompts], [], [], int(group_size))
    for start in range(0, len(out.prompts), int(groups_per_call)):
        chunk = out.prompts[start : start + int(groups_per_call)]
        seed_k = sampling_seed(seed, step, first_group + start if group_ids is None else int(group_ids[start]))
        with sampling_rng(device, seed_k):
            rows, ended = sample_ids(model, tokenizer, [p for p in chunk for _ in range(out.group_size)],
                                     do_sample=True, **settings)
        out.completions += rows
        out.ended += ended
        out.seeds.append(seed_k)
    return out


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                     device: Any = None) -> Dict[str, torch.Tensor]:
    """Model inputs for prompt + completion rows: input_ids / attention_mask [N, P + C] with the prompts
    left-padded to P and the completions right-padded to C, position_ids counted from each row's first real
    token, and completion_mask [N, C] (1 on completion tokens)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    P, C = max(map(len, prompts)), max(1, max(map(len, completions)))
    n = len(prompts)
    ids = torch.full((n, P + C), int(pad_id), dtype=torch.long)
    attention = torch.zeros((n, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        ids[i, P : P + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        attention[i, P - len(p) : P + len(c)] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": attention, "position_ids": positions,
             "completion_mask": attention[:, P:].clone()}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def token_logps(model: Any, batch: Dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of every completion position [N, C] (float32; 0 where completion_mask is 0), from
    one forward that computes logits for the completion positions only. With gradient unless the caller
    disables it. The log-softmax runs a row at a time: [C, vocabulary] in float32 at most."""
    C = batch["completion_mask"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, -(C + 1) : -1]  # position P - 1 + t predicts completion token t
    target = batch["input_ids"][:, -C:]
    rows = []
    for row_logits, row_target in zip(logits, target):
        row = row_logits.float() / float(temperature)
        rows.append(row.gather(-1, row_target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows) * batch["completion_mask"].to(torch.float32)


def rollout_batch(rollout: Rollout, tokenizer: Any, device: Any = None, rows: Optional[Sequence[int]] = None
                  ) -> Dict[str, torch.Tensor]:
    """`completion_batch` of a rollout's rows (all, or the listed ones: a micro-batch)."""
    prompts, completions = rollout.prompt_of_row(), rollout.completions
    picked = range(len(completions)) if rows is None else rows
    return completion_batch([prompts[i] for i in picked], [completions[i] for i in picked], pad_id_of(tokenizer),
                            device)


def no_grad_logps(model: Any, batch: Dict[str, torch.Tensor], context: Any = None,
                  temperature: float = 1.0) -> torch.Tensor:
    """`token_logps` without gradient, in eval mode, inside `context` when given (the rollout policy's pass:
    method.evaluation_context; the reference's: method.reference_context)."""
    was_training = model.training
    model.eval()
    try:
        with context if context is not None else contextlib.nullcontext(), torch.no_grad():
            return token_logps(model, batch, temperature)
    finally:
        model.train(was_training)
