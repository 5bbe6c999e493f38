"""Preference tuning of a causal LM (AutoModelForCausalLM): DPO, IPO and SimPO on pairs of answers to one prompt.

Data (`task.source` hub | local csv/json/jsonl/parquet | offline, e.g. `offline` + `pref_tiny`), one pair per row,
in the layouts of TRL's preference data sets:
  explicit prompt  columns task.prompt_field, task.chosen_field, task.rejected_field, each pair read as two
                   prompt/completion rows: strings are taken as they are, never through a chat template (TRL's
                   rule: the prompt holds its own format; the tokenizer's leading special tokens, BOS, go first);
                   lists of {role, content} turns are the prompt's turns, then the answer's, through the template.
  implicit prompt  no prompt column: chosen and rejected are whole conversations (lists of turns) that share
                   their prompt turns and differ in the last assistant turn, rendered with the chat template.
Every row is read and rendered by the one conversation reader (frod_cli.tasks.layouts). The prompt is everything
before the last assistant turn, the answer that turn as the template renders it (end-of-turn markup included;
EOS appended unless already there). The prompt and each answer are tokenized separately and concatenated, as
causal_lm does. A row is malformed
(refused in one line naming the first such row and the count, or dropped with counts under
`task.skip_malformed=true`) when a column or turn is missing, an answer is empty, the last turn of an answer is
not the assistant's, or, implicit prompt, the two conversations' prompts differ.

Truncation (`task.max_length`, prompt + answer), by the prompt-fitting rule (`layouts.fit_prompt`, which a
prompt-only task calls too): a prompt too long for itself and its longer answer drops its oldest whole turns
(back to a user turn; a system turn kept) until the answers fit; when even the last user turn (with the system
turn) leaves no room for them, the answers are cut on the right (their start kept) to the tokens it leaves; the
system turn goes too when that leaves none; a pair is dropped only when its last user turn alone fills max_length.
A string prompt has no turns to drop: its answers are cut. Shortened prompts (and the turns dropped), cut answers
and dropped pairs are counted per split and logged; a split in which every pair is dropped is refused.

Pairs whose chosen and rejected answers are the same carry no preference (their loss has no gradient, and
reward_accuracy never counts them right): a warning gives their count per split, and task.skip_malformed=true
drops them (counted). Number and boolean cells are written out as text (counted). Tool calls and a `tools` column
are read as causal_lm reads them (frod_cli/tasks/tool_calls.py): an answer may be a tool call.

Training: the chosen and the rejected sequences of a batch of B pairs go through the model in one forward (2B
rows, chosen first); the loss covers the answer tokens only (the prompt's labels are -100). log pi(y|x) is the
sum of the answer tokens' log-probabilities; |y| their count. `task.loss`:
  dpo    L = -log sigma( beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )
  ipo    L = ( h - 1/(2 beta) )^2,  h the same log-ratio difference on log-probabilities averaged over each
         answer's tokens (beta is the paper's tau; TRL and LLaMA-Factory average the same way)
  simpo  L = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )   (no reference)
The loss of a batch is the mean over its pairs.

The reference: pi_ref is the starting model, the policy before its first optimizer step. Every method starts
exactly there (FRoD is the base model bit for bit at initialization, LoRA/DoRA/VeRA add zero, PiSSA's residual
plus its adapter is the base weight, full fine-tuning has not moved), so the reference pass runs the model as the
training recipe holds it, once, before the first step (`prepare_training`): no second model in memory, and no
`disable_adapter` (which would give PiSSA's residual, not its starting model). log pi_ref of every chosen and
rejected answer of every split goes to `<run>/reference_logps.safetensors` (written atomically by the main
process, with each split's token fingerprint); a resumed run reads it back instead of recomputing (and refuses it
if the data changed). Its time and memory are in metrics.json (`task_preparation`). SimPO needs none.

Evaluation (`evaluate`): `loss`, `reward_accuracy` (share of pairs whose chosen answer's implicit reward is the
higher: r = beta (log pi - log pi_ref) for dpo, beta (mean log pi - mean log pi_ref) for ipo, beta/|y| log pi for
simpo), `reward_margin` (mean r_w - r_l), `chosen_reward`, `rejected_reward`, `chosen_logp`, `rejected_logp`
(mean summed log-probabilities of the policy), gathered over processes; per-pair records for predictions.jsonl.
`task.objective` is any of them (loss with objective_mode=min); `task.metrics` is not read (every evaluation
reports them all).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from frod_cli import FrodCliError, one_line

from . import tool_calls
from .base import register_task
from .layouts import ConversationConfig
from .common import DataTask, keep_configured_splits
from .sources import dedupe, load_raw, make_splits, require_columns

log = logging.getLogger(__name__)

LOSSES = ("dpo", "ipo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}
METRICS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
           "rejected_logp")
REFERENCE_FILE = "reference_logps.safetensors"
_OK, _TRUNCATED, _DROPPED = 0, 1, 2
_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF = ("ref_chosen", "ref_rejected")


# ------------------------------------------------------------------------------------------------ the losses
def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7), per pair, with the implicit reward r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)):
        L = -log sigma( r(x, y_w) - r(x, y_l) )
    Returns (L, r_w, r_l). At pi = pi_ref both rewards are 0 and L = log 2."""
    r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    return -F.logsigmoid(r_w - r_l), r_w, r_l


def ipo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             tau: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023, eq. 17), per pair, on log-probabilities averaged over each answer's tokens:
        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),   L = (h - 1/(2 tau))^2
    The squared loss pulls h to the margin 1/(2 tau) instead of pushing it to infinity as DPO's log-sigmoid does.
    Returns (L, r_w, r_l) with r = tau (log pi - log pi_ref)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    return (h - 1.0 / (2.0 * tau)) ** 2, tau * (pi_w - ref_w), tau * (pi_l - ref_l)


def simpo_loss(avg_w: torch.Tensor, avg_l: torch.Tensor, beta: float,
               gamma: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6), per pair, reference-free, avg = log pi(y|x) / |y|:
        L = -log sigma( beta avg_w - beta avg_l - gamma )
    Returns (L, r_w, r_l) with the length-normalized reward r = beta avg."""
    r_w, r_l = beta * avg_w, beta * avg_l
    return -F.logsigmoid(r_w - r_l - gamma), r_w, r_l


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (log pi(y|x), |y|): the sum of log p(token | the tokens before it) over the tokens whose
    label is not -100 (the answer), and their count. logits [N, T, V], labels [N, T]."""
    target = labels[:, 1:].to(logits.device)
    mask = target != -100
    # Only the answer positions go through the softmax: answers are short next to their prompts, and a
    # [tokens, vocabulary] log-softmax over every position would cost several times the time and memory.
    token_logp = -F.cross_entropy(logits[:, :-1][mask].float(), target[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    logp = torch.zeros(len(mask), dtype=token_logp.dtype, device=logits.device).index_add(0, rows, token_logp)
    return logp, mask.sum(-1)


def fingerprint(ds: datasets.Dataset) -> str:
    """sha256 of a split's token ids (prompt, chosen, rejected): what the stored reference values belong to."""
    h = hashlib.sha256()
    for column in _IDS:
        for ids in ds[column]:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ rows -> pairs
def _view(cfg: Any, **changes: Any) -> Any:
    """The task config as plain attributes with some keys changed: the shared reader reads an answer column
    under the key its layout uses (and names that column in its messages)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(vars(cfg))
    return SimpleNamespace(**{**values, **changes})


class _PairReader:
    """One raw row -> prompt tokens, chosen and rejected answer tokens (fitted to max_length), their texts, a
    status and counts. Rows are read and rendered by frod_cli.tasks.layouts; a row it cannot use raises
    MalformedRow."""

    def __init__(self, cfg: Any, tokenizer: Any, explicit_prompt: bool):
        from frod_cli.decoding import leading_special_ids

        self.tok, self.explicit, self.max_length = tokenizer, explicit_prompt, int(cfg.max_length)
        self.fields = (cfg.chosen_field, cfg.rejected_field)
        key = "completion_field" if explicit_prompt else "messages_field"
        self.views = [_view(cfg, **{key: f}) for f in self.fields]
        self.leading = leading_special_ids(tokenizer)

    def conversation(self, row: Dict[str, Any], k: int) -> Any:
        from . import layouts

        field, view = self.fields[k], self.views[k]
        conv = layouts.read(row, "prompt_completion" if self.explicit else "chat", view)
        last = conv.messages[-1]
        if last["role"] != "assistant":
            raise layouts.MalformedRow(f"the last turn of {field!r} is the {last['role']}'s, not an assistant answer")
        if not str(last["content"]).strip() and not last.get("tool_calls"):
            raise layouts.MalformedRow(f"the answer in {field!r} is empty")
        return conv

    def tokens(self, conv: Any, view: Any) -> Tuple[List[int], List[int], str]:
        """(prompt ids, answer ids with EOS, rendered prompt): the answer is the last trained segment."""
        from . import layouts

        pieces = layouts.conversation_segments(conv, self.tok, view)
        ids = layouts.token_segments(pieces, self.tok, with_template=layouts.templated(self.tok, conv.raw),
                                     leading=self.leading)
        prompt = [t for part, _ in ids[:-1] for t in part]
        return prompt, list(ids[-1][0]), "".join(text for text, _ in pieces[:-1])

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        from . import layouts

        w, l = self.conversation(row, 0), self.conversation(row, 1)
        if w.messages[:-1] != l.messages[:-1] or w.plain_prompt != l.plain_prompt:
            turn = next((i + 1 for i, (a, b) in enumerate(zip(w.messages[:-1], l.messages[:-1])) if a != b),
                        min(len(w.messages), len(l.messages)))
            raise layouts.MalformedRow(f"{self.fields[0]!r} and {self.fields[1]!r} do not share their prompt "
                                       f"(turn {turn} differs)")
        fitted = self.fit(w, l)
        counts = {"_identical": w.messages[-1] == l.messages[-1], "_converted": w.converted + l.converted}
        if fitted is None:
            return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt": "", "chosen": "",
                    "rejected": "", "_status": _DROPPED, "_turns_dropped": 0, **counts}
        (prompt, chosen, rejected, prompt_text), dropped = fitted
        room = self.max_length - len(prompt)
        status = _TRUNCATED if max(len(chosen), len(rejected)) > room else _OK
        return {"prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room],
                "prompt": prompt_text, "chosen": tool_calls.answer_text(w.messages[-1]),
                "rejected": tool_calls.answer_text(l.messages[-1]), "_status": status, "_turns_dropped": dropped, **counts}

    def pair_tokens(self, w: Any, l: Any) -> Tuple[List[int], List[int], List[int], str]:
        """(prompt, chosen, rejected ids, rendered prompt) of a pair as it stands."""
        from . import layouts

        prompt, chosen, prompt_text = self.tokens(w, self.views[0])
        prompt_l, rejected, _ = self.tokens(l, self.views[1])
        if prompt_l != prompt:  # the same turns rendered alike: a template that depends on the answer
            raise layouts.MalformedRow("the chat template renders the prompt of the two answers differently")
        return prompt, chosen, rejected, prompt_text

    def fit(self, w: Any, l: Any) -> Optional[Tuple[Tuple[List[int], List[int], List[int], str], int]]:
        """The pair's tokens with its prompt fitted to max_length by the prompt-fitting rule (layouts.fit_prompt:
        the oldest whole turns dropped, a system turn kept, before the answers are cut), and the turns dropped;
        None when not even the last user turn fits."""
        from . import layouts

        tokens = self.pair_tokens(w, l)
        longest = max(len(tokens[1]), len(tokens[2]))
        if len(tokens[0]) + longest <= self.max_length:
            return tokens, 0
        found = layouts.fit_prompt(w.messages[:-1], lambda turns: len(self.tokens(_with_prompt(w, turns),
                                                                                  self.views[0])[0]),
                                   self.max_length, longest)
        if found is None:
            return None
        turns, dropped = found
        if dropped:
            tokens = self.pair_tokens(_with_prompt(w, turns), _with_prompt(l, turns))
        return tokens, dropped


def _with_prompt(conv: Any, turns: List[Dict[str, str]]) -> Any:
    """The conversation with `turns` before its answer (its oldest turns dropped)."""
    from dataclasses import replace

    return replace(conv, messages=list(turns) + conv.messages[-1:],
                   prompt_turns=max(0, conv.prompt_turns - (len(conv.messages) - 1 - len(turns))))


_FEATURES = datasets.Features({
    **{c: datasets.Sequence(datasets.Value("int32")) for c in _IDS},
    "prompt": datasets.Value("string"), "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
    "_status": datasets.Value("int8"), "_turns_dropped": datasets.Value("int32"), "_identical": datasets.Value("bool"),
    "_converted": datasets.Value("int32"),
})


def collate_pairs(features: List[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded sequences, the chosen ones first, then the rejected ones in the same order
    (one forward for the whole batch); labels -100 on the prompt and the padding; the pairs' `index` in their
    split, and `ref_logps` (2B, same order) once the reference pass has added them."""
    seqs = [(f["prompt_ids"], f[key]) for key in ("chosen_ids", "rejected_ids") for f in features]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(seqs):
        n, k = len(prompt) + len(answer), len(prompt)
        ids[i, :n] = torch.as_tensor(list(prompt) + list(answer), dtype=torch.long)
        labels[i, k:n] = ids[i, k:n]
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "index": torch.as_tensor([int(f["index"]) for f in features], dtype=torch.long)}
    if _REF[0] in features[0]:
        batch["ref_logps"] = torch.as_tensor([float(f[c]) for c in _REF for f in features], dtype=torch.float32)
    return batch


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        return collate_pairs(features, self.pad_id)


@dataclass
class PreferenceConfig(ConversationConfig):
    """Pairs of answers to one prompt (TRL's prompt/chosen/rejected columns, or chosen/rejected conversations).
    Not here, because they do not apply to pairs: packing (pairs are never packed), train_on_prompt (the loss covers
    the answers only), mixture (one source of pairs per run), streaming (the reference pass reads every pair first)."""

    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    loss: str = "dpo"  # dpo | ipo | simpo
    beta: Optional[float] = None  # None: 0.1 for dpo and ipo (IPO's tau), 2.0 for simpo
    gamma: Optional[float] = None  # simpo's target reward margin; None: beta / 2
    objective: str = "reward_accuracy"
    objective_mode: str = "max"


@register_task("preference", config=PreferenceConfig)
class Preference(DataTask):
    auto_class = "AutoModelForCausalLM"
    default_modules_to_save = ()  # the LM head is part of the model
    lower_is_better = ("loss",)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from . import layouts

        super().check_config(cfg)
        if str(cfg.loss) not in LOSSES:
            raise FrodCliError(f"unknown task.loss {cfg.loss!r} for preference tuning; use {', '.join(LOSSES)}")
        if cfg.beta is not None and not float(cfg.beta) > 0:
            raise FrodCliError(f"task.beta must be positive, got {cfg.beta}")
        if cfg.gamma is not None and str(cfg.loss) != "simpo":
            raise FrodCliError(f"task.gamma is SimPO's target margin; task.loss={cfg.loss} has none (drop it)")
        if cfg.data_format != "auto":
            raise FrodCliError(f"task.data_format={cfg.data_format} does not apply to preference data: the layout "
                               "follows the columns (a prompt column or not); leave it at auto")
        layouts.check_chat_template_setting(cfg.chat_template)
        if int(cfg.max_length) < 2:
            raise FrodCliError(f"task.max_length must be at least 2 for a causal LM, got {cfg.max_length}")

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        self.loss_name = str(cfg.loss)
        self.beta = float(cfg.beta) if cfg.beta is not None else DEFAULT_BETA[self.loss_name]
        self.gamma = float(cfg.gamma) if cfg.gamma is not None else self.beta / 2
        self.explicit_prompt: Optional[bool] = None
        self.tokenizer: Any = None
        self.stats: Dict[str, Dict[str, int]] = {}
        self.pending: Optional[Tuple[Any, ...]] = None  # reference values for store_prepared

    @property
    def needs_reference(self) -> bool:
        return self.loss_name != "simpo"

    def metric_names(self) -> Optional[List[str]]:
        return list(METRICS)

    # ------------------------------------------------------------------------------------------- data
    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def stratify_column(self) -> Optional[str]:
        return None

    def _check_columns(self, raw: datasets.DatasetDict) -> None:
        """The layout from the train split's columns; every split must have the columns it reads."""
        cfg = self.cfg
        first = raw[cfg.train_split] if cfg.train_split in raw else next(iter(raw.values()))
        self.explicit_prompt = cfg.prompt_field in first.column_names
        need = [cfg.chosen_field, cfg.rejected_field] + ([cfg.prompt_field] if self.explicit_prompt else [])
        require_columns(raw, need, what="preference data: ")
        if not self.explicit_prompt and isinstance(first.features[cfg.chosen_field], datasets.Value):
            raise FrodCliError(f"preference data without a {cfg.prompt_field!r} column needs {cfg.chosen_field!r} and "
                               f"{cfg.rejected_field!r} as conversations (lists of turns) sharing their prompt turns; "
                               f"its columns are {first.column_names}")

    def load_data(self) -> datasets.DatasetDict:
        raw = keep_configured_splits(load_raw(self.cfg), self.cfg)
        self._check_columns(raw)
        if self.cfg.dedupe:
            cols = ([self.cfg.prompt_field] if self.explicit_prompt else []) + [self.cfg.chosen_field, self.cfg.rejected_field]
            raw = datasets.DatasetDict({s: dedupe(ds, cols) for s, ds in raw.items()})
        return make_splits(raw, self.cfg, self.seed, stratify_by=None)

    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        from . import layouts

        self.tokenizer = preprocessor
        if self.explicit_prompt is None:
            self._check_columns(data)
        reader = _PairReader(self.cfg, preprocessor, bool(self.explicit_prompt))
        out = {}
        for split, ds in data.items():
            enc, report = layouts.read_rows(ds, reader, self.cfg, split, features=_FEATURES, desc=f"tokenizing {split}")
            out[split] = self._keep(enc, split)
            self.stats[split]["malformed"] = report.malformed
        return datasets.DatasetDict(out)

    def data_stats(self) -> Dict[str, Any]:
        """What the task read, for metrics.json: per split, pairs read, kept, truncated, dropped, malformed."""
        return {"splits": self.stats}

    def _keep(self, enc: datasets.Dataset, split: str) -> datasets.Dataset:
        """Drop (and count) the pairs whose last user turn fills max_length, and with task.skip_malformed the
        pairs whose two answers are the same; refuse a split left empty; number the rest."""
        status = np.asarray(enc["_status"], dtype=np.int64)
        counts = np.bincount(status, minlength=3)
        turns = np.asarray(enc["_turns_dropped"], dtype=np.int64)
        identical = np.asarray(enc["_identical"], dtype=bool) & (status != _DROPPED)
        drop = (status == _DROPPED) | (identical if self.cfg.skip_malformed else False)
        n, max_len = len(enc), int(self.cfg.max_length)
        self.stats[split] = {"pairs": n, "kept": int(n - drop.sum()), "truncated": int(counts[_TRUNCATED]),
                             "dropped": int(counts[_DROPPED]), "prompts_shortened": int((turns > 0).sum()),
                             "prompt_turns_dropped": int(turns.sum()), "identical": int(identical.sum()),
                             "converted": int(np.sum(np.asarray(enc["_converted"], dtype=np.int64)))}
        self._log_counts(split, self.stats[split], max_len, int(((status != _OK) | (turns > 0)).sum()))
        if self.stats[split]["kept"] == 0:
            if counts[_DROPPED]:
                raise FrodCliError(f"every pair of split {split!r} is too long: its last user turn alone fills "
                                   f"task.max_length={max_len} ({n} pairs); raise task.max_length")
            raise FrodCliError(f"split {split!r} has no pair left: the chosen and rejected answers of all {n} are the "
                               "same (task.skip_malformed=true dropped them)")
        if drop.any():
            enc = enc.select(np.flatnonzero(~drop))
        enc = enc.remove_columns([c for c in ("_status", "_row", "_turns_dropped", "_identical", "_converted")
                                  if c in enc.column_names])
        return enc.add_column("index", list(range(len(enc))))

    def _log_counts(self, split: str, st: Dict[str, int], max_len: int, too_long: int) -> None:
        if too_long:
            log.warning("preference split %r: %d of %d pairs too long for task.max_length=%d: %d prompts shortened "
                        "(%d oldest turns dropped in all, a system turn kept), %d with their answers cut on the "
                        "right, %d dropped (the last user turn alone fills max_length)", split, too_long, st["pairs"],
                        max_len, st["prompts_shortened"], st["prompt_turns_dropped"], st["truncated"], st["dropped"])
        else:
            log.info("preference split %r: %d pairs, none longer than task.max_length=%d", split, st["pairs"], max_len)
        if st["identical"]:
            if self.cfg.skip_malformed:
                log.warning("preference split %r: dropped %d pairs whose chosen and rejected answers are the same "
                            "(task.skip_malformed=true)", split, st["identical"])
            else:
                log.warning("preference split %r: %d of %d pairs have the same chosen and rejected answer: they carry "
                            "no preference (no gradient; reward_accuracy never counts them right); "
                            "task.skip_malformed=true drops them", split, st["identical"], st["pairs"])
        if st["converted"]:
            log.info("preference split %r: %d number or boolean cells written out as text", split, st["converted"])

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        from frod_cli.decoding import pad_id_of

        self.tokenizer = preprocessor
        return _Collator(pad_id_of(preprocessor))

    # ----------------------------------------------------------------------------------------------- loss
    def model_inputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The model's inputs from a batch (the loss, the reference pass and the merge check feed it these)."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}

    def sequence_logps(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log pi(y|x), |y|) of the batch's 2B sequences, from one forward."""
        return answer_logps(model(**self.model_inputs(model, batch)).logits, batch["labels"])

    def pair_terms(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """Per pair: (L, r_w, r_l, log pi(y_w|x), log pi(y_l|x)) for task.loss."""
        logp, count = self.sequence_logps(model, batch)
        pi_w, pi_l = logp.chunk(2)
        n_w, n_l = count.clamp(min=1).to(logp.dtype).chunk(2)
        if self.loss_name == "simpo":
            return (*simpo_loss(pi_w / n_w, pi_l / n_l, self.beta, self.gamma), pi_w, pi_l)
        if "ref_logps" not in batch:
            raise RuntimeError("preference: a batch without reference log-probabilities (prepare_training not run)")
        ref_w, ref_l = batch["ref_logps"].to(logp).chunk(2)
        if self.loss_name == "dpo":
            return (*dpo_loss(pi_w, pi_l, ref_w, ref_l, self.beta), pi_w, pi_l)
        return (*ipo_loss(pi_w / n_w, pi_l / n_l, ref_w / n_w, ref_l / n_l, self.beta), pi_w, pi_l)

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_terms(model, batch)[0].mean()

    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(chosen reward above the rejected one, 1) per pair: compute_metrics turns them into reward_accuracy."""
        _, r_w, r_l, _, _ = self.pair_terms(model, batch)
        return (r_w > r_l).float(), torch.ones_like(r_w)

    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        total = float(np.sum(references))
        return {"reward_accuracy": float(np.sum(predictions)) / total if total else 0.0}

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module, dataset: Any, loader: Any,
                 accelerator: Any) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
        if self.needs_reference and _REF[0] not in dataset.column_names:
            raise FrodCliError(f"task.loss={self.loss_name} scores the policy against the reference log-probabilities, "
                               f"and this split has none: evaluate a preference run directory (they are stored in it, "
                               f"{REFERENCE_FILE}) or use task.loss=simpo")
        parts = []
        with torch.no_grad():
            for batch in loader:
                terms = self.pair_terms(model, batch)
                rows = torch.stack([t.detach().double() for t in terms] + [batch["index"].double()], dim=1)
                parts.append(accelerator.gather_for_metrics(rows.contiguous()).cpu())
        table = torch.cat(parts)
        loss, r_w, r_l, pi_w, pi_l = table[:, :5].unbind(1)
        metrics = {"loss": loss.mean(), "reward_accuracy": (r_w > r_l).double().mean(),
                   "reward_margin": (r_w - r_l).mean(), "chosen_reward": r_w.mean(), "rejected_reward": r_l.mean(),
                   "chosen_logp": pi_w.mean(), "rejected_logp": pi_l.mean()}
        return {k: float(v) for k, v in metrics.items()}, self.records(dataset, table)

    def records(self, dataset: Any, table: torch.Tensor) -> List[Dict[str, Any]]:
        """predictions.jsonl rows: one per pair, in the split's order."""
        index = [int(i) for i in table[:, 5].tolist()]
        rows = dataset.select_columns([c for c in ("prompt", "chosen", "rejected", *_REF) if c in dataset.column_names])
        out = []
        for i, (loss, r_w, r_l, pi_w, pi_l) in zip(index, table[:, :5].tolist()):
            row = rows[i]
            rec = {"index": i, "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                   "chosen_logp": pi_w, "rejected_logp": pi_l, "chosen_reward": r_w, "rejected_reward": r_l,
                   "margin": r_w - r_l, "loss": loss, "correct": bool(r_w > r_l)}
            if _REF[0] in row:
                rec.update(ref_chosen_logp=row[_REF[0]], ref_rejected_logp=row[_REF[1]])
            out.append(rec)
        return out

    # ------------------------------------------------------------------------------------- the reference
    def reference_logps(self, model: torch.nn.Module, encoded: Dict[str, datasets.Dataset], accelerator: Any,
                        batch_size: int) -> Dict[str, torch.Tensor]:
        """log pi_ref(y_w|x), log pi_ref(y_l|x) of every pair of every split ([n, 2], in split order), with `model`
        as it is now, in eval mode; each process runs its share of the batches and gets all of them back."""
        from torch.utils.data import DataLoader

        collate = self.collate(self.tokenizer)
        was_training = model.training
        model.eval()
        out = {}
        try:
            with torch.no_grad():
                for split, ds in encoded.items():
                    loader = accelerator.prepare(DataLoader(ds.select_columns([*_IDS, "index"]),
                                                            batch_size=int(batch_size), collate_fn=collate))
                    parts = []
                    for batch in loader:
                        logp, _ = self.sequence_logps(model, batch)
                        pairs = torch.stack(logp.float().chunk(2), dim=1)
                        parts.append(accelerator.gather_for_metrics(pairs.contiguous()).cpu())
                    out[split] = torch.cat(parts)
        finally:
            model.train(was_training)
        return out

    def prepare_training(self, model: torch.nn.Module, encoded: Dict[str, datasets.Dataset], accelerator: Any,
                         run_dir: str, batch_size: int, resuming: bool) -> Optional[Dict[str, Any]]:
        """The reference pass (see the module docstring): the model is the starting model here. A resumed run
        reads its stored values back instead; either way they become columns of every split. The file is
        written by `store_prepared`, once the run is accepted."""
        self.pending = None
        if not self.needs_reference:
            return {"reference": None, "why": f"task.loss={self.loss_name} is reference-free"}
        path = os.path.join(run_dir, REFERENCE_FILE)
        prints = {split: fingerprint(ds) for split, ds in encoded.items()}
        values = self._stored_reference(path, prints, accelerator) if resuming else None
        if values is not None:
            info = {"computed": False, "file": REFERENCE_FILE, "pairs": sum(len(v) for v in values.values())}
            log.info("preference: reference log-probabilities of %d pairs read back from %s", info["pairs"], path)
        else:
            from frod_cli.memory import PeakMemory

            memory, t0 = PeakMemory(accelerator.device), time.time()  # the pass's own peak (frod_cli/memory.py)
            values = self.reference_logps(model, encoded, accelerator, batch_size)
            info = {"computed": True, "file": REFERENCE_FILE, "pairs": sum(len(v) for v in values.values()),
                    "seconds": time.time() - t0, "peak_memory_mb": memory.peak_mb()}
            self.pending = (values, prints, info)
            log.info("preference: reference log-probabilities of %d pairs in %.1f s (peak memory %.0f MiB)",
                     info["pairs"], info["seconds"], info["peak_memory_mb"])
        attach_reference(encoded, values)
        return {"reference": info}

    def store_prepared(self, run_dir: str) -> None:
        """<run>/reference_logps.safetensors: every split's [n, 2] values, its token fingerprint, the pass's
        time and memory (written atomically; a resumed run that read them back writes nothing)."""
        from safetensors.torch import save

        from frod_cli.runs.io import atomic_write_bytes

        if self.pending is None:
            return
        values, prints, info = self.pending
        meta = {"format": "frod-preference-reference/1", "columns": "chosen,rejected",
                "fingerprints": json.dumps(prints), "info": json.dumps(info)}
        atomic_write_bytes(os.path.join(run_dir, REFERENCE_FILE),
                           save({s: v.contiguous() for s, v in values.items()}, metadata=meta))
        self.pending = None

    def prepare_evaluation(self, encoded: Dict[str, datasets.Dataset], run_dir: str) -> None:
        """`frod eval` of a run directory: the reference values stored by its training, for the splits whose
        tokens are the ones they were computed on."""
        path = os.path.join(run_dir, REFERENCE_FILE)
        if not self.needs_reference or not os.path.isfile(path):
            return
        stored, meta = _read_reference(path)
        same = {s: v for s, v in stored.items() if s in encoded and meta.get(s) == fingerprint(encoded[s])}
        attach_reference(encoded, same)

    def _stored_reference(self, path: str, prints: Dict[str, str], accelerator: Any) -> Optional[Dict[str, torch.Tensor]]:
        """The values a resumed run stored (read by the main process, sent to the others); None when there are
        none; refused when they belong to other data."""
        from accelerate.utils import broadcast_object_list

        box: List[Any] = [None]
        if accelerator.is_main_process and os.path.isfile(path):
            stored, meta = _read_reference(path)
            changed = sorted(s for s in prints if meta.get(s) != prints[s] or s not in stored)
            box[0] = changed or stored
        if accelerator.num_processes > 1:
            broadcast_object_list(box)
        if isinstance(box[0], list):
            raise FrodCliError(f"resume: {path} holds the reference log-probabilities of other data (split "
                               f"{', '.join(map(repr, box[0]))} changed since the run started)")
        if box[0] is None:
            log.warning("preference: resuming without %s; computing the reference again (the model has not been "
                        "restored yet, so it is still the starting model)", path)
        return box[0]


def _read_reference(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(split -> [n, 2] values, split -> token fingerprint) of a stored reference file; a damaged one is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            values = {k: f.get_tensor(k) for k in f.keys()}
        return values, json.loads(meta.get("fingerprints", "{}"))
    except (OSError, ValueError, SafetensorError) as e:
        raise FrodCliError(f"{path} cannot be read ({one_line(e)}): "
                           "delete it to compute the reference again") from e


def attach_reference(encoded: Dict[str, datasets.Dataset], values: Dict[str, torch.Tensor]) -> None:
    """The reference values as columns ref_chosen, ref_rejected of their splits (in place: same rows, same order)."""
    for split, v in values.items():
        ds = encoded[split]
        if len(v) != len(ds):
            raise RuntimeError(f"preference: {len(v)} reference values for {len(ds)} pairs of split {split!r}")
        ds = ds.remove_columns([c for c in _REF if c in ds.column_names])
        for k, column in enumerate(_REF):
            ds = ds.add_column(column, v[:, k].tolist(), feature=datasets.Value("float32"))
        encoded[split] = ds
