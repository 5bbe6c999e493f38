"""Multiple choice scored by a causal LM (PIQA, ARC, BoolQ, HellaSwag, or any list-of-choices schema).

Each choice's score is the sum of the log-probabilities of its tokens given the prompt (no length
normalisation). Training minimises cross-entropy over an example's K choice scores; the prediction is the
argmax. Examples may have different K (ARC has 3-5): missing choices score -inf.

Schemas recognised by `normalise` (first match, by the train split's columns), all rewritten to
`prompt` (str), `choices` (list of str), `label` (0-based index; -1 when hidden):
  piqa       goal, sol1, sol2, label
  arc        question, choices{text,label}, answerKey (a letter or digit from choices.label)
  boolq      question, passage, answer (bool)            -> choices "no"/"yes"
  hellaswag  ctx, endings, label (string digit)
  siqa       context, question, answerA, answerB, answerC, label (string "1".."3")
  winogrande sentence (with a "_" blank), option1, option2, answer ("1"/"2"; "" when hidden)
  generic    task.question_field, task.choices_field (a list of str, or {text: [...]}),
             task.label_field (0-based int, a choice's text, or a letter A, B, ...),
             optional task.context_field placed before the question
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import datasets
import torch
import torch.nn.functional as F

from .base import register_task
from .common import LabelledConfig, LabelledTask, is_missing

SCHEMAS = ("piqa", "arc", "boolq", "hellaswag", "siqa", "winogrande", "generic")
_MC_FEATURES = datasets.Features(
    {"prompt": datasets.Value("string"), "choices": datasets.Sequence(datasets.Value("string")), "label": datasets.Value("int64")}
)


def _qa(question: str, context: Optional[str] = None) -> str:
    return (f"{context.strip()}\n" if context else "") + f"Question: {str(question).strip()}\nAnswer:"


def _label_index(value: Any, choices: List[str], keys: Optional[List[str]] = None) -> int:
    """0-based index of the answer; -1 when hidden. Raises ValueError when it names no choice."""
    if is_missing(value):
        return -1
    if keys is not None:  # ARC: answerKey names one of choices.label ("A".."E" or "1".."5")
        if str(value) in keys:
            return keys.index(str(value))
    elif isinstance(value, (int,)) and not isinstance(value, bool) and 0 <= value < len(choices):
        return int(value)
    elif isinstance(value, str):
        if value in choices:
            return choices.index(value)
        letters = string.ascii_uppercase[: len(choices)]
        if len(value) == 1 and value.upper() in letters:
            return letters.index(value.upper())
    raise ValueError(f"answer {value!r} names none of the {len(choices)} choices {choices}")


def detect_schema(columns: List[str], cfg: Any) -> str:
    cols = set(columns)
    if {"goal", "sol1", "sol2"} <= cols:
        return "piqa"
    if {"question", "choices", "answerKey"} <= cols:
        return "arc"
    if {"question", "passage", "answer"} <= cols:
        return "boolq"
    if {"ctx", "endings"} <= cols:
        return "hellaswag"
    if {"context", "question", "answerA", "answerB", "answerC"} <= cols:
        return "siqa"
    if {"sentence", "option1", "option2", "answer"} <= cols:
        return "winogrande"
    need = [cfg.question_field, cfg.choices_field, cfg.label_field] + ([cfg.context_field] if cfg.context_field else [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise ValueError(
            f"multiple choice data has no column {', '.join(map(repr, missing))} and matches none of "
            f"{', '.join(SCHEMAS[:-1])}; its columns are {sorted(columns)}"
        )
    return "generic"


def normalise_example(ex: Dict[str, Any], schema: str, cfg: Any) -> Tuple[str, List[str], int]:
    if schema == "piqa":
        choices = [ex["sol1"], ex["sol2"]]
        return _qa(ex["goal"]), choices, _label_index(ex.get("label"), choices)
    if schema == "arc":
        choices, keys = list(ex["choices"]["text"]), [str(k) for k in ex["choices"]["label"]]
        return _qa(ex["question"]), choices, _label_index(ex["answerKey"], choices, keys)
    if schema == "boolq":
        question = str(ex["question"]).strip().rstrip("?") + "?"
        return _qa(question, ex["passage"]), ["no", "yes"], -1 if ex["answer"] is None else int(bool(ex["answer"]))
    if schema == "hellaswag":
        choices, label = list(ex["endings"]), ex.get("label")
        return str(ex["ctx"]).strip(), choices, -1 if is_missing(label) else _label_index(int(label), choices)
    if schema == "siqa":
        choices, label = [ex["answerA"], ex["answerB"], ex["answerC"]], ex.get("label")
        return _qa(ex["question"], ex["context"]), choices, -1 if is_missing(label) else _label_index(int(label) - 1, choices)
    if schema == "winogrande":
        # The options fill the blank: ask what "_" stands for (the sentence is the context).
        choices, answer = [ex["option1"], ex["option2"]], ex.get("answer")
        prompt = _qa('What does the blank "_" refer to?', ex["sentence"])
        return prompt, choices, -1 if is_missing(answer) else _label_index(int(answer) - 1, choices)
    choices = ex[cfg.choices_field]
    choices = list(choices["text"] if isinstance(choices, dict) else choices)
    context = ex[cfg.context_field] if cfg.context_field else None
    return _qa(ex[cfg.question_field], context), [str(c) for c in choices], _label_index(ex[cfg.label_field], choices)


@dataclass
class MultipleChoiceConfig(LabelledConfig):
    """The generic schema's columns (the known schemas are recognised by their columns)."""

    question_field: str = "question"
    choices_field: str = "choices"  # a list of strings, or {text: [...]}
    context_field: Optional[str] = None  # placed before the question


@register_task("multiple_choice", config=MultipleChoiceConfig)
class MultipleChoice(LabelledTask):
    auto_class = "AutoModelForCausalLM"
    default_modules_to_save = ()  # the LM head scores choices; there is no new head to train

    def input_columns(self) -> List[str]:
        return ["prompt", "choices"]

    @property
    def num_labels(self) -> Optional[int]:
        return None

    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def normalise(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        schema = detect_schema(raw[self.cfg.train_split].column_names if self.cfg.train_split in raw else next(iter(raw.values())).column_names, self.cfg)

        def fn(batch: Dict[str, list]) -> Dict[str, list]:
            rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
            out = {"prompt": [], "choices": [], "label": []}
            for ex in rows:
                prompt, choices, label = normalise_example(ex, schema, self.cfg)
                if len(choices) < 2:
                    raise ValueError(f"an example has {len(choices)} choice(s); multiple choice needs at least 2")
                out["prompt"].append(prompt)
                out["choices"].append(choices)
                out["label"].append(label)
            return out

        return datasets.DatasetDict(
            {s: ds.map(fn, batched=True, remove_columns=ds.column_names, features=_MC_FEATURES) for s, ds in raw.items()}
        )

    def prepare_labels(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        for split, ds in raw.items():
            if -1 in ds.unique("label"):
                raise ValueError(f"split {split!r} has examples without an answer; label every example or drop the split")
        return raw

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        tok, max_len = preprocessor, self.cfg.max_length
        # The prompt keeps the tokenizer's own specials (LLaMA's BOS); choices continue it with none.
        # A prompt that tokenizes to nothing still needs one token for the first choice token to be scored from.
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

        def fn(batch: Dict[str, list]) -> Dict[str, list]:
            prompts = tok(batch["prompt"], add_special_tokens=True)["input_ids"]
            flat = tok([" " + c.strip() for cs in batch["choices"] for c in cs], add_special_tokens=False)["input_ids"]
            out: Dict[str, list] = {"prompt_ids": [], "choice_ids": [], "labels": batch["label"]}
            i = 0
            for p, cs in zip(prompts, batch["choices"]):
                c = [ids[: max_len - 1] or [start] for ids in flat[i : i + len(cs)]]
                i += len(cs)
                # Left-truncate the prompt: the end of the context matters most for the answer.
                keep = max_len - max(map(len, c))
                out["prompt_ids"].append(p[len(p) - keep :] if len(p) > keep else p or [start])
                out["choice_ids"].append(c)
            return out

        return data.map(fn, batched=True, remove_columns=next(iter(data.values())).column_names)

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        pad_id = preprocessor.pad_token_id if preprocessor.pad_token_id is not None else preprocessor.eos_token_id

        def collate_fn(features: list) -> Dict[str, torch.Tensor]:
            seqs, targets = [], []
            for f in features:
                for c in f["choice_ids"]:
                    seqs.append(f["prompt_ids"] + c)
                    targets.append(len(c))
            width = max(map(len, seqs))
            k_max = max(len(f["choice_ids"]) for f in features)
            # Left padding puts every choice's tokens at the end of its row, so the model only has to
            # produce logits for the last few positions (`logits_to_keep`) instead of the whole sequence.
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
            target_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
            for i, (s, t) in enumerate(zip(seqs, targets)):
                input_ids[i, width - len(s) :] = torch.tensor(s)
                attention_mask[i, width - len(s) :] = 1
                target_mask[i, width - t :] = True
            choice_valid = torch.zeros((len(features), k_max), dtype=torch.bool)
            for b, f in enumerate(features):
                choice_valid[b, : len(f["choice_ids"])] = True
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "target_mask": target_mask,
                "choice_valid": choice_valid,
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
            }

        return collate_fn

    # ------------------------------------------------------------------------------------------ scoring
    def outputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(model, batch).float()

    def scores(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, K] summed choice log-probs; -inf where an example has fewer than K choices."""
        ids, mask, tmask = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        keep = int(tmask.sum(-1).max()) + 1
        # Explicit positions: with left padding, rows must still start at position 0 (GPT-2's absolute
        # embeddings would otherwise shift; RoPE is unaffected but this costs nothing).
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep).logits
        logits = logits[:, -keep:-1].float()  # positions predicting the last keep-1 tokens
        tgt = ids[:, -keep + 1 :]
        token_logp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        seq_scores = (token_logp * tmask[:, -keep + 1 :]).sum(-1)
        valid = batch["choice_valid"]
        out = seq_scores.new_full(valid.shape, float("-inf"))
        out[valid] = seq_scores
        return out

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.scores(model, batch), batch["labels"])

    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.scores(model, batch).argmax(-1), batch["labels"]
