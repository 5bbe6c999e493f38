"""Online RL with verifiable rewards (`task.type=grpo`): the GRPO family on a causal LM (AutoModelForCausalLM).

Data: one prompt per row, from a prompt column (`task.prompt_field`: a string, taken as it is with the tokenizer's
leading special tokens first, never through a chat template, as TRL does; or a list of turns) or chat messages
(`task.messages_field`: the turns, a trailing assistant turn dropped); turns go through the chat template with the
generation prompt (`task.chat_template` as in SFT). Every other column (e.g. `answer`) reaches the rewards. A
prompt longer than task.max_length - task.max_completion_length tokens is dropped and counted; a split where every
prompt is too long is refused.

Each optimizer step (`GrpoStep`, the strategy frod_cli/tasks/steps.py calls): G = task.group_size completions of
each prompt of the window sampled from the current policy inside method.evaluation_context (seeded per
(train.seed, step, row): frod_cli/rl/rollout.py), scored by task.rewards (frod_cli/tasks/rewards.py), advantages
normalized per group, and the loss of task.loss_type (frod_cli/rl/loss.py) over the completions in micro-batches
of task.completions_per_backward, each normalized by the whole rollout's counts (so the loop does not divide
again). task.beta > 0 adds the KL penalty against the starting model (Method.reference_context; refused for
methods that cannot give it). Per-step metrics: each reward's mean and std, the total's, groups_all_equal,
completion length (mean, max, share cut at the limit), the clip fractions, kl when beta > 0.

Evaluation: greedy completions of up to task.eval_max_examples held-out prompts, scored by the same rewards:
reward_mean, reward/<name>/mean, and accuracy/<name> for every reward whose values there are all 0 or 1; the
per-prompt completions in predictions.jsonl.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch

from frod_cli import FrodCliError
from frod_cli.rl import loss as L
from frod_cli.rl.step import GrpoSettings, batch_loss, collect

from .base import register_task
from .common import DataTask, keep_configured_splits
from .layouts import ConversationConfig
from .rewards import RewardConfig, RewardSet, completion_text
from .sources import DATA_DIR, load_raw, make_splits, register_source
from .steps import StepOutcome, TrainingStep

log = logging.getLogger(__name__)


def _default_rewards() -> List[RewardConfig]:
    return [RewardConfig(name="math")]


@dataclass
class GrpoConfig(ConversationConfig):
    """Prompts and the columns the rewards read; G; the loss variant and its clip; sampling; the rewards."""

    rewards: List[RewardConfig] = field(default_factory=_default_rewards)
    group_size: int = 8  # G: completions per prompt (at least 2: advantages compare within a group)
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo (frod_cli/rl/loss.py)
    beta: float = 0.0  # KL penalty against the starting model
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None  # None: the variant's (dapo 0.28, grpo and dr_grpo 0.2)
    num_iterations: int = 1  # optimization passes per rollout (only 1 so far)
    max_completion_length: int = 32  # new tokens per completion
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    groups_per_call: int = 1  # groups per generate call
    completions_per_backward: int = 64  # completions per forward + backward (memory)
    eval_max_examples: int = 64  # held-out prompts generated per evaluation; 0: all
    eval_batch_size: int = 16
    objective: str = "reward_mean"
    objective_mode: str = "max"


@register_source("arith_rl_tiny")
def arith_rl_tiny() -> datasets.DatasetDict:
    """96 one-step arithmetic word problems with their answers (prompt, answer, steps), written by
    scripts/make_arith_rl.py into the package."""
    import json

    path = DATA_DIR / "arith_rl_tiny.jsonl"
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict(train=datasets.Dataset.from_list(rows))


@register_task("grpo", config=GrpoConfig)
class Grpo(DataTask):
    auto_class = "AutoModelForCausalLM"
    default_modules_to_save = ()

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from . import layouts

        super().check_config(cfg)
        checks = [(int(cfg.group_size) >= 2, f"task.group_size must be at least 2 (advantages compare the "
                                             f"completions of one prompt), got {cfg.group_size}"),
                  (str(cfg.loss_type) in L.VARIANTS, f"unknown task.loss_type {cfg.loss_type!r}; use "
                                                     f"{', '.join(L.VARIANTS)}"),
                  (float(cfg.beta) >= 0, f"task.beta must be >= 0, got {cfg.beta}"),
                  (int(cfg.num_iterations) == 1, "task.num_iterations > 1 (several passes per rollout) is not "
                                                 "implemented yet; use 1"),
                  (int(cfg.max_completion_length) >= 1, "task.max_completion_length must be at least 1"),
                  (int(cfg.max_length) > int(cfg.max_completion_length), f"task.max_length={cfg.max_length} leaves "
                   f"no room for a prompt before task.max_completion_length={cfg.max_completion_length} new tokens"),
                  (float(cfg.temperature) > 0, f"task.temperature must be > 0, got {cfg.temperature}"),
                  (min(int(cfg.groups_per_call), int(cfg.completions_per_backward), int(cfg.eval_batch_size)) >= 1,
                   "task.groups_per_call, completions_per_backward and eval_batch_size must be at least 1"),
                  (len(cfg.rewards) > 0, "task.rewards is empty: name at least one reward")]
        for ok, message in checks:
            if not ok:
                raise FrodCliError(message)
        layouts.check_chat_template_setting(cfg.chat_template)

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        self.tokenizer: Any = None
        self.rewards = RewardSet.from_configs(list(cfg.rewards), int(cfg.max_completion_length))
        self.stats: Dict[str, Dict[str, int]] = {}
        self.chat = False

    def settings(self) -> GrpoSettings:
        c = self.cfg
        return GrpoSettings(group_size=int(c.group_size), loss_type=str(c.loss_type), beta=float(c.beta),
                            epsilon_low=float(c.epsilon_low), epsilon_high=c.epsilon_high,
                            num_iterations=int(c.num_iterations), max_completion_length=int(c.max_completion_length),
                            temperature=float(c.temperature), top_p=float(c.top_p), top_k=int(c.top_k),
                            groups_per_call=int(c.groups_per_call))

    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def stratify_column(self) -> Optional[str]:
        return None

    def load_data(self) -> datasets.DatasetDict:
        raw = keep_configured_splits(load_raw(self.cfg), self.cfg)
        return make_splits(raw, self.cfg, self.seed, stratify_by=None)

    # ---------------------------------------------------------------------------------------------- prompts
    def prompt_of(self, row: Dict[str, Any]) -> Tuple[Any, List[int]]:
        """(the prompt as the rewards receive it, its token ids) of one row (module docstring)."""
        from frod_cli.decoding import has_chat_template, leading_special_ids

        cfg, tok = self.cfg, self.tokenizer
        value = row.get(cfg.prompt_field)
        if isinstance(value, str):
            return value, leading_special_ids(tok) + list(tok(value, add_special_tokens=False)["input_ids"])
        if value is None:
            value = row.get(cfg.messages_field)
            if value is None:
                raise FrodCliError(f"grpo data: a row has neither a {cfg.prompt_field!r} nor a {cfg.messages_field!r} "
                                   f"column; its columns are {sorted(row)}")
        turns = [dict(t) for t in value]
        while turns and turns[-1].get("role") == "assistant":
            turns.pop()  # the answer of a chat row is the policy's to write
        if cfg.system_prompt and not any(t.get("role") == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": cfg.system_prompt})
        if not turns or not has_chat_template(tok):
            raise FrodCliError("grpo data: chat turns need a tokenizer with a chat template (task.chat_template=chatml)"
                               if turns else "grpo data: a chat row has no turn before its answer")
        self.chat = True
        text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return turns, list(tok(text, add_special_tokens=False)["input_ids"])

    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        """prompt_ids and index added to every split; prompts longer than the room before the completion dropped
        and counted; a split left empty refused."""
        self.tokenizer = preprocessor
        room = int(self.cfg.max_length) - int(self.cfg.max_completion_length)
        out = {}
        for split, ds in data.items():
            ids = [self.prompt_of(row)[1] for row in ds]
            kept = [i for i, p in enumerate(ids) if len(p) <= room]
            self.stats[split] = {"prompts": len(ds), "kept": len(kept), "too_long": len(ds) - len(kept)}
            if not kept:
                raise FrodCliError(f"every prompt of split {split!r} is longer than task.max_length - "
                                   f"task.max_completion_length = {room} tokens ({len(ds)} prompts); raise "
                                   f"task.max_length")
            if len(kept) < len(ds):
                log.warning("grpo split %r: %d of %d prompts longer than %d tokens dropped", split,
                            len(ds) - len(kept), len(ds), room)
            ds = ds.select(kept).add_column("prompt_ids", [ids[i] for i in kept])
            out[split] = ds.add_column("index", list(range(len(kept))))
        return datasets.DatasetDict(out)

    def data_stats(self) -> Dict[str, Any]:
        return {"splits": self.stats}

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, Any]]:
        self.tokenizer = preprocessor
        skip = {"prompt_ids", "index"}

        def collate_fn(rows: list) -> Dict[str, Any]:
            return {"index": torch.tensor([int(r["index"]) for r in rows], dtype=torch.long),
                    "prompt_ids": [list(r["prompt_ids"]) for r in rows],
                    "reward_prompts": [self.prompt_of(r)[0] if not isinstance(r.get(self.cfg.prompt_field), str)
                                       else r[self.cfg.prompt_field] for r in rows],
                    "columns": {k: [r[k] for r in rows] for k in rows[0] if k not in skip}}

        return collate_fn

    def model_inputs(self, model: torch.nn.Module, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The batch's prompts, left-padded (what the merge check compares the merged and the adapted model on)."""
        from frod_cli.decoding import left_pad, pad_id_of

        ids, mask = left_pad(batch["prompt_ids"], pad_id_of(self.tokenizer))
        device = next(model.parameters()).device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def training_step(self, loop: Any) -> "GrpoStep":
        return GrpoStep(self, loop)

    # ---------------------------------------------------------------------------------------------- evaluation
    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("grpo evaluates by generation (Grpo.evaluate), not by batched predict")

    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        raise RuntimeError("grpo evaluates by generation (Grpo.evaluate), not by batched predict")

    def evaluate(self, model: torch.nn.Module, dataset: Any, loader: Any,
                 accelerator: Any) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
        """Greedy completions of this process's share of the first task.eval_max_examples prompts, scored; every
        process gets all records back (module docstring)."""
        from accelerate.utils import gather_object

        from frod_cli.decoding import generate_ids

        limit = int(self.cfg.eval_max_examples)
        n = len(dataset) if limit == 0 else min(limit, len(dataset))
        mine = list(range(accelerator.process_index, n, accelerator.num_processes))
        records: List[Dict[str, Any]] = []
        if mine:
            rows = self.collate(self.tokenizer)([dataset[i] for i in mine])
            gens = generate_ids(accelerator.unwrap_model(model), self.tokenizer, rows["prompt_ids"],
                                batch_size=int(self.cfg.eval_batch_size),
                                max_new_tokens=int(self.cfg.max_completion_length))
            texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
            completions = [[{"role": "assistant", "content": t}] for t in texts] if self.chat else texts
            scores = self.rewards.score(rows["reward_prompts"], completions, {**rows["columns"], "completion_ids": gens})
            for k, i in enumerate(mine):
                values = {name: (None if v != v else v) for name, v in zip(scores.names, scores.per_reward[k].tolist())}
                records.append({"index": i, "prompt": completion_text(rows["reward_prompts"][k]), "completion": texts[k],
                                "rewards": values, "reward": float(scores.total[k])})
        if accelerator.num_processes > 1:
            records = sorted(gather_object(records), key=lambda r: r["index"])
        return _eval_metrics(records, self.rewards.names), records


def _eval_metrics(records: List[Dict[str, Any]], names: Sequence[str]) -> Dict[str, float]:
    """reward_mean; per reward its mean over the prompts it applies to, and accuracy/<name> when its values are all
    0 or 1."""
    out = {"reward_mean": sum(r["reward"] for r in records) / max(len(records), 1)}
    for name in names:
        short = name.rsplit(":", 1)[-1]
        values = [r["rewards"][name] for r in records if r["rewards"][name] is not None]
        out[f"reward/{short}/mean"] = sum(values) / len(values) if values else float("nan")
        if values and all(v in (0.0, 1.0) for v in values):
            out[f"accuracy/{short}"] = out[f"reward/{short}/mean"]
    return out


class GrpoStep(TrainingStep):
    """The rollout-based strategy: `prepare` samples and scores (outside the method's accumulation window) and
    splits the rollout's completions into micro-batches; `run` backpropagates each micro-batch's loss, already
    normalized by the whole rollout's counts."""

    def __init__(self, task: Grpo, loop: Any):
        super().__init__(task, loop)
        self.settings = task.settings()
        if self.settings.beta > 0:
            why = loop.method.reference_refusal()
            if why:
                raise FrodCliError(why)
        self.data: Any = None
        self.examples = 0
        self.logged: List[Dict[str, float]] = []

    def prepare(self, window: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        loop, task = self.loop, self.task
        prompts = [p for b in window for p in b["prompt_ids"]]
        columns = {k: [v for b in window for v in b["columns"][k]] for k in window[0]["columns"]}
        self.data = collect(loop.unwrapped, loop.method, task.tokenizer, prompts,
                            [p for b in window for p in b["reward_prompts"]], columns, task.rewards, self.settings,
                            seed=int(loop.cfg.train.seed), step=int(loop.state.step),
                            group_ids=[int(i) for b in window for i in b["index"].tolist()], chat=task.chat)
        self.examples = len(prompts)
        n, k = len(self.data.rollout.completions), int(task.cfg.completions_per_backward)
        return [{"rows": list(range(s, min(n, s + k)))} for s in range(0, n, k)]

    def run(self, window: List[Dict[str, Any]]) -> StepOutcome:
        loop = self.loop
        device = loop.acc.device
        out = StepOutcome(*(torch.zeros((), device=device) for _ in range(4)), examples=self.examples)
        parts: List[Dict[str, torch.Tensor]] = []
        for j, micro in enumerate(window):
            with loop.micro_batch(j, len(window)):
                loss, metrics = batch_loss(loop.model, self.data, self.task.tokenizer, micro["rows"], self.settings)
                value = loss.detach().float().reshape(())
                nonfinite = ~torch.isfinite(value)
                out.nonfinite += nonfinite
                out.bad_value = torch.where(nonfinite, value, out.bad_value)
                loop.acc.backward(loss)  # normalized by the rollout's counts already: no division by the window
            out.loss_sum += value
            parts.append(metrics)
        out.count += 1
        step = dict(self.data.metrics)
        step.update({k: float(sum(float(p[k]) for p in parts) / len(parts)) for k in parts[0]})
        self.logged.append(step)
        self.data = None  # the rollout is not kept past its step (num_iterations = 1)
        return out

    def log_metrics(self) -> Dict[str, float]:
        if not self.logged:
            return {}
        keys = sorted({k for m in self.logged for k in m})
        means = torch.tensor([sum(m.get(k, 0.0) for m in self.logged) / len(self.logged) for k in keys],
                             dtype=torch.float64, device=self.loop.acc.device)
        if self.loop.acc.num_processes > 1:
            means = self.loop.acc.reduce(means, reduction="mean")
        self.logged = []
        return dict(zip(keys, means.tolist()))
