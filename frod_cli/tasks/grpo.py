"""Online RL with verifiable rewards (`task.type=grpo`): the GRPO family on a causal LM (AutoModelForCausalLM).

Data: one prompt per row, from a prompt column (`task.prompt_field`: a string, taken as it is with the tokenizer's
leading special tokens first, never through a chat template, as TRL does; or a list of turns) or chat messages
(`task.messages_field`: the turns, a trailing assistant turn dropped); turns go through the chat template with the
generation prompt (`task.chat_template` as in SFT). Every other column (e.g. `answer`) reaches the rewards. A
prompt longer than task.max_length - task.max_completion_length tokens is fitted by the one prompt-fitting rule
(frod_cli/tasks/layouts.py fit_prompt: its oldest whole turns dropped, back to a user turn, a system turn kept);
one that still leaves no room for task.max_completion_length new tokens (a string prompt, or a last user turn
that alone is too long) is dropped: every completion of a run shares one length limit. The prompts shortened,
the turns dropped and the prompts dropped are counted per split (metrics.json `data_counts`); a split where
every prompt is dropped is refused.

Each rollout (`GrpoStep`, the strategy frod_cli/tasks/steps.py calls): G = task.group_size completions of each
prompt of the window sampled from the current policy inside method.evaluation_context (seeded per (train.seed,
step, row): frod_cli/rl/rollout.py), scored by task.rewards (frod_cli/tasks/rewards.py), advantages normalized
per group, and the loss of task.loss_type (frod_cli/rl/loss.py) over the completions in micro-batches of
task.completions_per_backward, each normalized by the whole rollout's counts (so the loop does not divide
again). With task.num_iterations = mu > 1 a rollout is sampled at every mu-th optimizer step and trained on for
mu steps, the clipped ratio taken against the log-probabilities of the policy that sampled it; the windows of
the mu - 1 steps between are not sampled (counted as prompts_not_sampled: an epoch rolls out 1/mu of its
prompts, as in TRL when its data loader does not repeat them). task.beta > 0 adds the KL penalty against the
starting model (Method.reference_context; refused for methods that cannot give it).

Per-step figures (metrics.jsonl, the trackers), over every process's completions: each reward's mean and std,
the total's (reward/mean, reward/std), groups_all_equal, completion_length/mean, max and cut (the share that hit
the limit), at the steps that sample; every step: clip_low, clip_high, clip_fraction, ratio_mean/min/max, and
kl when beta > 0. Evaluation: greedy completions of up to task.eval_max_examples held-out prompts, scored by the
same rewards: reward_mean, reward_std, reward/<name>/mean and /std, accuracy/<name> for every reward whose values
there are all 0 or 1, completion_length/*; the per-prompt completions in predictions.jsonl.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch

from frod_cli import FrodCliError
from frod_cli.rl import loss as L
from frod_cli.rl.step import Collected, GrpoSettings, batch_loss, collect, rollout_metrics

from .base import register_task
from .common import DataTask, keep_configured_splits
from .layouts import ConversationConfig
from .rewards import RewardConfig, RewardSet, completion_text, reference_columns
from .sources import DATA_DIR, load_raw, make_splits, register_source, require_columns
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
    # optimization passes (optimizer steps) per rollout: a rollout every num_iterations-th step, reused until then
    num_iterations: int = 1
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


def packaged_problems(name: str) -> datasets.DatasetDict:
    """A packaged set of arithmetic word problems with their answers (frod_cli/tasks/data/<name>.jsonl, written by
    scripts/make_arith_rl.py): arith_rl_tiny, 96 one-step problems as a prompt column (what the smoke recipe's
    tiny random model trains on); math_word_problems, 320 problems of one or two steps as chat turns (the
    SmolLM2 comparison's)."""
    import json

    with open(DATA_DIR / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict(train=datasets.Dataset.from_list(rows))


for _name in ("arith_rl_tiny", "math_word_problems"):
    register_source(_name)(functools.partial(packaged_problems, _name))


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
                  (int(cfg.num_iterations) >= 1, f"task.num_iterations must be at least 1, got {cfg.num_iterations}"),
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
        self.rollout_counts: Dict[str, int] = {}  # GrpoStep's (rollouts, prompts sampled and not, completions)
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
        data = make_splits(raw, self.cfg, self.seed, stratify_by=None)
        self.check_columns(data)
        return data

    def check_columns(self, data: datasets.DatasetDict) -> None:
        """The prompt column (or the chat turns) and the reference columns of the built-in rewards are in every
        split: refused here, before the model is loaded, rather than at encoding or at the first step."""
        cfg = self.cfg
        for split, ds in data.items():
            if cfg.prompt_field not in ds.column_names and cfg.messages_field not in ds.column_names:
                raise FrodCliError(f"grpo data: split {split!r} has neither a {cfg.prompt_field!r} (task.prompt_field) "
                                   f"nor a {cfg.messages_field!r} (task.messages_field) column; its columns are "
                                   f"{ds.column_names}")
        for name, answer_column in reference_columns(list(cfg.rewards)):
            require_columns(data, [answer_column], what=f"reward {name}: ")

    # ---------------------------------------------------------------------------------------------- prompts
    def prompt_turns(self, row: Dict[str, Any]) -> Any:
        """The row's prompt as the rewards receive it: the prompt column's string, or its turns (a prompt column
        that is a list of turns, else the messages column, a trailing assistant turn dropped) with the system
        prompt added when they have none."""
        cfg = self.cfg
        value = row.get(cfg.prompt_field)
        if isinstance(value, str):
            return value
        if value is None:
            value = row.get(cfg.messages_field)
            if value is None:
                raise FrodCliError(f"grpo data: a row has neither a {cfg.prompt_field!r} nor a {cfg.messages_field!r} "
                                   f"column; its columns are {sorted(row)}")
        turns = [dict(t) for t in value]
        if any("role" not in t for t in turns):
            raise FrodCliError(f"grpo data: a turn without a 'role' in a row's prompt: {turns!r:.120}")
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()  # the answer of a chat row is the policy's to write
        if cfg.system_prompt and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": cfg.system_prompt})
        if not turns:
            raise FrodCliError("grpo data: a chat row has no turn before its answer")
        return turns

    def render(self, prompt: Any) -> List[int]:
        """Token ids of a prompt: a string as it is after the tokenizer's leading special tokens (never through
        a chat template, as TRL does), turns through the chat template with the generation prompt."""
        from frod_cli.decoding import has_chat_template, leading_special_ids

        tok = self.tokenizer
        if isinstance(prompt, str):
            return leading_special_ids(tok) + list(tok(prompt, add_special_tokens=False)["input_ids"])
        if not has_chat_template(tok):
            raise FrodCliError("grpo data: chat turns need a tokenizer with a chat template (task.chat_template=chatml)")
        self.chat = True
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def fitted(self, row: Dict[str, Any]) -> Optional[Tuple[Any, List[int], int]]:
        """(the prompt, its token ids, the turns dropped) with room for task.max_completion_length new tokens
        within task.max_length, by the prompt-fitting rule (layouts.fit_prompt: the oldest whole turns dropped,
        a system turn kept); None when no fitted prompt leaves that room (a string prompt has no turns to drop)."""
        from .layouts import fit_prompt

        cfg, prompt = self.cfg, self.prompt_turns(row)
        room = int(cfg.max_length) - int(cfg.max_completion_length)
        ids = self.render(prompt)
        if len(ids) <= room:
            return prompt, ids, 0
        if isinstance(prompt, str):
            return None
        found = fit_prompt(prompt, lambda turns: len(self.render(turns)), int(cfg.max_length),
                           int(cfg.max_completion_length))
        if found is None:
            return None
        ids = self.render(found[0])
        return (found[0], ids, found[1]) if len(ids) <= room else None  # a cut completion budget: dropped

    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        """prompt_ids, turns_dropped and index added to every split; prompts fitted (`fitted`), those that still
        leave no room dropped; what that did counted; a split left empty refused."""
        self.tokenizer = preprocessor
        room = int(self.cfg.max_length) - int(self.cfg.max_completion_length)
        out = {}
        for split, ds in data.items():
            fits = [self.fitted(row) for row in ds]
            kept = [i for i, f in enumerate(fits) if f is not None]
            counts = {"prompts": len(ds), "kept": len(kept), "shortened": sum(1 for i in kept if fits[i][2]),
                      "turns_dropped": sum(fits[i][2] for i in kept), "too_long": len(ds) - len(kept)}
            self.stats[split] = counts
            if not kept:
                raise FrodCliError(f"every prompt of split {split!r} is longer than task.max_length - "
                                   f"task.max_completion_length = {room} tokens, even with its oldest turns dropped "
                                   f"({len(ds)} prompts); raise task.max_length")
            if counts["too_long"] or counts["shortened"]:
                log.warning("grpo split %r: %d of %d prompts longer than %d tokens: %d shortened (%d oldest turns "
                            "dropped), %d dropped (not even their last user turn leaves the room)", split,
                            counts["too_long"] + counts["shortened"], len(ds), room, counts["shortened"],
                            counts["turns_dropped"], counts["too_long"])
            ds = ds.select(kept).add_column("prompt_ids", [fits[i][1] for i in kept])
            ds = ds.add_column("turns_dropped", [fits[i][2] for i in kept])
            out[split] = ds.add_column("index", list(range(len(kept))))
        return datasets.DatasetDict(out)

    def data_stats(self) -> Dict[str, Any]:
        """Per split the prompts read, kept, shortened (turns dropped) and dropped; the rollouts of the run."""
        return {"splits": self.stats, **({"rollouts": dict(self.rollout_counts)} if self.rollout_counts else {})}

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, Any]]:
        self.tokenizer = preprocessor
        skip = {"prompt_ids", "index", "turns_dropped"}

        def reward_prompt(row: Dict[str, Any]) -> Any:  # the prompt as fitted (its turns rendered again)
            return self.fitted(row)[0] if row["turns_dropped"] else self.prompt_turns(row)

        def collate_fn(rows: list) -> Dict[str, Any]:
            return {"index": torch.tensor([int(r["index"]) for r in rows], dtype=torch.long),
                    "prompt_ids": [list(r["prompt_ids"]) for r in rows],
                    "reward_prompts": [reward_prompt(r) for r in rows],
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

        limit = int(self.cfg.eval_max_examples)
        n = len(dataset) if limit == 0 else min(limit, len(dataset))
        mine = list(range(accelerator.process_index, n, accelerator.num_processes))
        records = self.score_greedy(accelerator.unwrap_model(model), [dataset[i] for i in mine], mine) if mine else []
        if accelerator.num_processes > 1:
            records = sorted(gather_object(records), key=lambda r: r["index"])
        return _eval_metrics(records, self.rewards.names), records

    def score_greedy(self, model: torch.nn.Module, rows: List[Dict[str, Any]], indices: List[int]) -> List[Dict[str, Any]]:
        """One record per row: its greedy completion (up to task.max_completion_length tokens, EOS included in
        `tokens` as in training), each reward, the weighted total."""
        from frod_cli.decoding import sample_ids

        batch, size = self.collate(self.tokenizer)(rows), int(self.cfg.eval_batch_size)
        gens: List[List[int]] = []
        ended: List[bool] = []
        for start in range(0, len(rows), size):
            g, e = sample_ids(model, self.tokenizer, batch["prompt_ids"][start : start + size], do_sample=False,
                              max_new_tokens=int(self.cfg.max_completion_length))
            gens, ended = gens + g, ended + e
        texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
        completions = [[{"role": "assistant", "content": t}] for t in texts] if self.chat else texts
        scores = self.rewards.score(batch["reward_prompts"], completions, {**batch["columns"], "completion_ids": gens})
        return [{"index": i, "prompt": completion_text(batch["reward_prompts"][k]), "completion": texts[k],
                 "rewards": {name: (None if v != v else v) for name, v in zip(scores.names, scores.per_reward[k].tolist())},
                 "reward": float(scores.total[k]), "tokens": len(gens[k]), "cut": not ended[k]}
                for k, i in enumerate(indices)]


def _eval_metrics(records: List[Dict[str, Any]], names: Sequence[str]) -> Dict[str, float]:
    """reward_mean and reward_std over the prompts; per reward its mean and std over the prompts it applies to,
    and accuracy/<name> when its values are all 0 or 1; the completion lengths (mean, max, share cut)."""
    totals = torch.tensor([r["reward"] for r in records], dtype=torch.float64)
    tokens = torch.tensor([r["tokens"] for r in records], dtype=torch.float64)
    out = {"reward_mean": float(totals.mean()), "reward_std": float(totals.std(unbiased=False)),
           "completion_length/mean": float(tokens.mean()), "completion_length/max": float(tokens.max()),
           "completion_length/cut": sum(r["cut"] for r in records) / len(records)}
    for name in names:
        short = name.rsplit(":", 1)[-1]
        values = torch.tensor([r["rewards"][name] for r in records if r["rewards"][name] is not None],
                              dtype=torch.float64)
        out[f"reward/{short}/mean"] = float(values.mean()) if len(values) else float("nan")
        out[f"reward/{short}/std"] = float(values.std(unbiased=False)) if len(values) else float("nan")
        if len(values) and all(v in (0.0, 1.0) for v in values.tolist()):
            out[f"accuracy/{short}"] = out[f"reward/{short}/mean"]
    return out


# figures of a pass that are means over its completion tokens: summed weighted by tokens over the micro-batches
# and the processes, then divided (so N processes report what one does at the same global batch)
_TOKEN_MEANS = ("clip_low", "clip_high", "clip_fraction", "ratio_mean", "kl")


class GrpoStep(TrainingStep):
    """The rollout-based strategy. `prepare` samples and scores (outside the method's accumulation window) at every
    task.num_iterations-th optimizer step and keeps the rollout for the steps between; it splits the rollout's
    completions into micro-batches. `run` backpropagates each micro-batch's loss, already normalized by the whole
    rollout's counts (the loop does not divide by the window). The kept rollout, the figures not logged yet and
    the counts go into every checkpoint (`state_dict`): a resumed run trains on what the uninterrupted one did."""

    def __init__(self, task: Grpo, loop: Any):
        super().__init__(task, loop)
        self.settings = task.settings()
        if self.settings.beta > 0:
            why = loop.method.reference_refusal()
            if why:
                raise FrodCliError(why)
        self.data: Optional[Collected] = None
        self.passes = 0  # optimizer steps taken on self.data
        self.figures: Dict[str, float] = {}  # the rollout's figures, logged with the step that sampled it
        self.pending: List[Dict[str, float]] = []  # per-step figures since the last log line
        task.rollout_counts = self.counts = {"rollouts": 0, "prompts_sampled": 0, "completions": 0,
                                             "prompts_not_sampled": 0}

    def prepare(self, window: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        loop = self.loop
        if loop.state.step % self.settings.num_iterations == 0:
            self.data, self.passes = self._collect(window), 0
        elif self.data is None:
            raise RuntimeError(f"grpo: step {loop.state.step + 1} reuses a rollout that is not there")
        else:  # the steps between two rollouts train on the kept one: this window's prompts are not sampled
            self.counts["prompts_not_sampled"] += sum(len(b["prompt_ids"]) for b in window) * loop.acc.num_processes
        n, k = len(self.data.rollout.completions), int(self.task.cfg.completions_per_backward)
        return [{"rows": list(range(s, min(n, s + k)))} for s in range(0, n, k)]

    def _collect(self, window: List[Dict[str, Any]]) -> Collected:
        """A rollout of the window's prompts; its figures over every process's completions (gathered)."""
        loop, task, acc = self.loop, self.task, self.loop.acc
        columns = {k: [v for b in window for v in b["columns"][k]] for k in window[0]["columns"]}
        data = collect(loop.unwrapped, loop.method, task.tokenizer, [p for b in window for p in b["prompt_ids"]],
                       [p for b in window for p in b["reward_prompts"]], columns, task.rewards, self.settings,
                       seed=int(loop.cfg.train.seed), step=int(loop.state.step),
                       group_ids=[int(i) for b in window for i in b["index"].tolist()], chat=task.chat)
        scores, (lengths, ended) = data.scores, data.lengths_and_ended()
        table = torch.cat([scores.per_reward, scores.total[:, None], lengths[:, None], ended[:, None]], dim=1)
        if acc.num_processes > 1:
            table = acc.gather(table.to(acc.device)).cpu()
        k = scores.per_reward.shape[1]
        everyone = dataclasses.replace(scores, per_reward=table[:, :k], total=table[:, k])
        data.num_tokens = float(table[:, k + 1].sum()) / acc.num_processes
        self.figures = rollout_metrics(everyone, table[:, k + 1], table[:, k + 2], self.settings.group_size)
        G = self.settings.group_size
        self.counts["rollouts"] += 1
        self.counts["prompts_sampled"] += len(table) // G
        self.counts["completions"] += len(table)
        return data

    def run(self, window: List[Dict[str, Any]]) -> StepOutcome:
        loop, data = self.loop, self.data
        device = loop.acc.device
        out = StepOutcome(*(torch.zeros((), device=device) for _ in range(4)), examples=len(data.rollout.prompts))
        sums: Dict[str, float] = {"tokens": 0.0, "ratio_min": math.inf, "ratio_max": -math.inf}
        for j, micro in enumerate(window):
            with loop.micro_batch(j, len(window)):
                loss, metrics = batch_loss(loop.model, data, self.task.tokenizer, micro["rows"], self.settings,
                                           iteration=self.passes)
                value = loss.detach().float().reshape(())
                nonfinite = ~torch.isfinite(value)
                out.nonfinite += nonfinite
                out.bad_value = torch.where(nonfinite, value, out.bad_value)
                loop.acc.backward(loss)  # normalized by the rollout's counts already: no division by the window
            out.loss_sum += value
            tokens = float(sum(len(data.rollout.completions[i]) for i in micro["rows"]))
            for key in _TOKEN_MEANS:
                if key in metrics:
                    sums[key] = sums.get(key, 0.0) + float(metrics[key]) * tokens
            sums["tokens"] += tokens
            sums["ratio_min"] = min(sums["ratio_min"], float(metrics["ratio_min"]))
            sums["ratio_max"] = max(sums["ratio_max"], float(metrics["ratio_max"]))
        out.count += 1
        self.pending.append({**self.figures, **self._pass_figures(sums)})
        self.figures = {}
        self.passes += 1
        if self.passes >= self.settings.num_iterations:
            self.data = None  # its last pass is done
        return out

    def _pass_figures(self, sums: Dict[str, float]) -> Dict[str, float]:
        """The pass's clip and ratio figures (and kl) over every process's completion tokens."""
        acc = self.loop.acc
        keys = sorted(k for k in sums if k not in ("ratio_min", "ratio_max"))
        vector = torch.tensor([sums[k] for k in keys] + [-sums["ratio_min"], sums["ratio_max"]], dtype=torch.float64,
                              device=acc.device)
        rows = acc.gather(vector[None]) if acc.num_processes > 1 else vector[None]
        total = rows[:, : len(keys)].sum(dim=0)
        tokens = float(total[keys.index("tokens")])
        out = {k: float(total[i]) / tokens for i, k in enumerate(keys) if k != "tokens"}
        out["ratio_min"], out["ratio_max"] = -float(rows[:, -2].max()), float(rows[:, -1].max())
        return out

    def log_metrics(self) -> Dict[str, float]:
        """Each figure's mean over the steps since the last log line that have it (the rollout's figures belong to
        the step that sampled it); already the same on every process."""
        keys = sorted({k for m in self.pending for k in m})
        out = {}
        for k in keys:
            values = [m[k] for m in self.pending if k in m]
            out[k] = sum(values) / len(values)
        self.pending = []
        return out

    def state_dict(self) -> Dict[str, Any]:
        state = {"passes": self.passes, "pending": self.pending, "counts": dict(self.counts)}
        return {**state, **(self.data.state_dict("buffer.") if self.data is not None else {})}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.passes, self.pending = int(state.get("passes", 0)), list(state.get("pending", []))
        self.counts.update(state.get("counts", {}))
        if "buffer.rollout" in state:
            self.data = Collected.from_state(state, "buffer.", self.loop.acc.device)
