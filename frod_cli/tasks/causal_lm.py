"""Instruction / chat fine-tuning of a causal LM (AutoModelForCausalLM), evaluated by loss and generation.

Data (`task.source` hub | local csv/json/jsonl/parquet | offline, e.g. `offline` + `sft_tiny`); a missing
validation/test split is carved out of train (seeded, not stratified). `task.data_format`:
  instruction  columns task.instruction_field, task.output_field and, when the data has it,
               task.input_field. Without a chat template the prompt is the plain layout
                   [system_prompt\\n\\n]### Instruction:\\n<instruction>\\n\\n[### Input:\\n<input>\\n\\n]### Response:\\n
               and the response is <output> + EOS. When the tokenizer has a chat template the pair is
               rendered as one user turn (instruction, a blank line, input) and one assistant turn, like chat.
  chat         task.messages_field: a list of {role, content}; rendered with the tokenizer's chat template
               (refused without one); task.system_prompt becomes a system turn when the conversation has
               none. Loss on the assistant turns only (each turn's text as the template renders it,
               end-of-turn markup included); EOS appended to the last one unless the template already
               put it there. Turns after the last assistant turn are dropped. For generation the prompt is
               everything before the last assistant turn with the generation prompt, the reference that turn.
  text         task.text_fields[0] (one column): plain documents, loss on every token, EOS appended;
               no generation (there is no reference answer), only loss and perplexity.
  template     task.prompt_template and task.response_template: format strings over any columns
               ("Q: {question}\\nA:", " {answer}"; frod_cli.tasks.templates, so `{choices!l}` lists work);
               task.system_prompt, when set, is a first paragraph.
  auto         template if task.prompt_template is set, else chat if the messages column exists, else
               instruction if the instruction and output columns exist, else text.
Every format except text puts the tokenizer's leading special tokens (BOS) before a plain prompt; chat
templates carry their own. Prompt and response are tokenized separately and concatenated, and generation
starts from exactly the prompt tokens used in training.

Labels: the prompt's labels are -100 (`task.train_on_prompt=false`, the default) so the loss covers the
response (+ EOS) only. Examples longer than `task.max_length` are truncated on the right (the response is
cut); an example whose prompt alone fills max_length is dropped. Both counts are logged per split, and a
split in which every example is dropped is refused.

Packing (`task.packing=true`, the train split only): whole examples are packed in order into blocks of at
most max_length tokens (an example is never split across blocks; a batch pads its blocks to the longest).
Each block carries `position_ids` that restart at 0 for every example, no attention_mask, and the label of
each example's first token is -100 (it would be predicted from the previous example). With no
attention_mask, transformers' `masking_utils` (5.x; checked with 5.23 for LLaMA) derives a block-diagonal
causal mask from the restarting position_ids for eager and sdpa attention (flash-attention reads them as
varlen boundaries; not tested here, no GPU): tokens attend only within their own example
(tests/test_causal_lm.py checks, with sdpa on CPU, that a packed block's logits equal each example's own). Models whose modelling code does not build its mask
through `masking_utils.create_causal_mask` (older or custom architectures) attend across examples within
a block: there only the labels and positions respect the boundaries.

Evaluation (`evaluate`): the token-weighted mean cross-entropy over the response tokens (`loss`), its
`perplexity` = exp(loss) and `token_accuracy` (argmax next-token accuracy on the same tokens), gathered
over processes; then greedy generation (`task.generation.*`) for the first `task.generation.max_examples`
examples of the split that have a reference (0 = all), with left padding. The answer is read off the new
tokens with `task.answer_pattern` (frod_cli.tasks.answers; the same rule on the reference) and scored with
`exact_match` on the normalised strings, plus `accuracy` over task.labels when they are set (an answer that
is not a label is wrong). Records {index, prompt, prediction, extracted, reference, reference_answer,
correct} are gathered to every process. Generation runs on the unwrapped model, a contiguous share of
the examples per process; every process runs as many batches as the largest share (a short share is padded
and the padding dropped), so an FSDP model, whose every forward gathers weights from all ranks, generates
too (train.fsdp).
The default `predict`/`compute_metrics` path gives `token_accuracy` only. `task.metrics` is not read:
`task.objective` must be one of loss, perplexity (objective_mode=min), token_accuracy, exact_match, or
accuracy (with task.labels); anything else is refused when the task is built.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from frod_cli import FrodCliError

from .. import metrics as metrics_lib
from . import templates
from .answers import answer_rule, normalize_answer
from .base import register_task
from .common import DataTask, keep_configured_splits
from .sources import dedupe, load_raw, make_splits

log = logging.getLogger(__name__)

FORMATS = ("auto", "instruction", "chat", "text", "template")
LOSS_METRICS = ("loss", "perplexity", "token_accuracy")
_OK, _TRUNCATED, _DROPPED, _NO_ASSISTANT = 0, 1, 2, 3


def instruction_prompt(instruction: str, input: Optional[str] = None, system_prompt: Optional[str] = None) -> str:
    """The plain prompt layout of instruction data (no chat template)."""
    parts = [system_prompt.strip()] if system_prompt and system_prompt.strip() else []
    parts.append(f"### Instruction:\n{str(instruction).strip()}")
    if input is not None and str(input).strip():
        parts.append(f"### Input:\n{str(input).strip()}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def instruction_user_turn(instruction: str, input: Optional[str] = None) -> str:
    text = str(instruction).strip()
    return text + (f"\n\n{str(input).strip()}" if input is not None and str(input).strip() else "")


def _fill(template: str, row: Dict[str, Any], key: str) -> str:
    return templates.render(template, {k: "" if v is None else v for k, v in row.items()}, key)


class _Sequence:
    """Token ids with labels, built segment by segment."""

    def __init__(self) -> None:
        self.ids: List[int] = []
        self.labels: List[int] = []

    def add(self, ids: Sequence[int], train: bool) -> None:
        self.ids += list(ids)
        self.labels += list(ids) if train else [-100] * len(ids)


class _Encoder:
    """Turns one raw row into model inputs. Holds plain values only (datasets hashes it for its map cache)."""

    def __init__(self, cfg: Any, fmt: str, tok: Any, chat: bool, prefix: List[int]):
        self.fmt, self.tok, self.chat, self.prefix = fmt, tok, chat, list(prefix)
        self.max_length, self.train_on_prompt = int(cfg.max_length), bool(cfg.train_on_prompt)
        self.system_prompt = cfg.system_prompt
        self.instruction_field, self.input_field, self.output_field = cfg.instruction_field, cfg.input_field, cfg.output_field
        self.messages_field, self.text_field = cfg.messages_field, (list(cfg.text_fields) or ["text"])[0]
        self.prompt_template, self.response_template = cfg.prompt_template, cfg.response_template

    def encode_text(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def chat_segments(self, messages: List[Dict[str, Any]]) -> Optional[List[Tuple[str, bool]]]:
        """[(text, is_assistant)] whose concatenation is the rendered conversation up to its last assistant
        turn; None when there is no assistant turn."""
        msgs = [{"role": str(m["role"]), "content": "" if m.get("content") is None else str(m["content"])} for m in messages]
        if self.system_prompt and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        msgs = msgs[: last + 1]

        def render(ms: List[Dict[str, str]], gen: bool) -> str:
            return self.tok.apply_chat_template(ms, add_generation_prompt=gen, tokenize=False)

        segments, prev = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head, full = render(msgs[:i], True) if i else "", render(msgs[: i + 1], False)
            if not head.startswith(prev) or not full.startswith(head):
                raise FrodCliError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                   f"continuation (turn {i}): the assistant tokens cannot be located for the loss")
            segments += [(head[len(prev):], False), (full[len(head):], True)]
            prev = full
        return segments

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """input_ids, labels, prompt_len, prompt, reference, has_reference, _status for one raw row."""
        fmt, eos = self.fmt, self.tok.eos_token_id
        seq, train_prompt = _Sequence(), self.train_on_prompt
        if self.chat:
            if fmt == "chat":
                messages = list(row[self.messages_field] or [])
            else:  # instruction data rendered as one user turn and one assistant turn
                inp = row.get(self.input_field) if self.input_field else None
                out = row[self.output_field]
                messages = [{"role": "user", "content": instruction_user_turn(row[self.instruction_field], inp)},
                            {"role": "assistant", "content": "" if out is None else str(out)}]
            segments = self.chat_segments(messages)
            if segments is None:
                return {"_status": _NO_ASSISTANT}
            reference = next(m for m in reversed(messages) if m["role"] == "assistant").get("content") or ""
            pieces = [self.encode_text(text) for text, _ in segments]
            if eos is not None and eos not in pieces[-1]:
                pieces[-1].append(eos)
            for (_, assistant), ids in zip(segments, pieces):
                seq.add(ids, assistant or train_prompt)
            prompt_len = sum(len(p) for p in pieces[:-1])
            prompt_text = "".join(text for text, _ in segments[:-1])
        else:
            if fmt == "text":
                value = row[self.text_field]
                prompt_text, response, train_prompt = "", "" if value is None else str(value), True
            elif fmt == "instruction":
                inp = row.get(self.input_field) if self.input_field else None
                prompt_text = instruction_prompt(row[self.instruction_field], inp, self.system_prompt)
                response = "" if row[self.output_field] is None else str(row[self.output_field])
            else:  # template
                prompt_text = _fill(self.prompt_template, row, "task.prompt_template")
                if self.system_prompt:
                    prompt_text = f"{self.system_prompt.strip()}\n\n{prompt_text}"
                response = _fill(self.response_template, row, "task.response_template")
            seq.add(self.prefix, False)
            seq.add(self.encode_text(prompt_text), train_prompt)
            prompt_len = len(seq.ids)
            seq.add(self.encode_text(response) + ([eos] if eos is not None else []), True)
            reference = "" if fmt == "text" else response
        if prompt_len >= self.max_length:
            return {"_status": _DROPPED}
        status = _OK
        if len(seq.ids) > self.max_length:
            seq.ids, seq.labels, status = seq.ids[: self.max_length], seq.labels[: self.max_length], _TRUNCATED
        reference = str(reference)
        return {"input_ids": seq.ids, "labels": seq.labels, "prompt_len": prompt_len, "prompt": prompt_text,
                "reference": reference, "has_reference": bool(reference.strip()), "_status": status}


@register_task("causal_lm")
class CausalLM(DataTask):
    auto_class = "AutoModelForCausalLM"
    modality = "text"
    default_modules_to_save = ()  # the LM head is part of the model: no new head to train

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        if cfg.data_format not in FORMATS:
            raise FrodCliError(f"unknown task.data_format {cfg.data_format!r}; use {', '.join(FORMATS)}")
        if int(cfg.max_length) < 2:
            raise FrodCliError(f"task.max_length must be at least 2 for a causal LM, got {cfg.max_length}")
        self.extract = answer_rule(cfg.answer_pattern)  # refuses an unknown rule or a bad regex now
        for tpl in (cfg.prompt_template, cfg.response_template):
            if tpl is not None:
                templates.fields(tpl)
        known = list(LOSS_METRICS) + ["exact_match"] + (["accuracy"] if cfg.labels else [])
        if cfg.objective not in known:
            raise FrodCliError(f"task.objective {cfg.objective!r} is not a causal_lm metric; use one of {', '.join(known)}"
                               + (" (accuracy needs task.labels)" if cfg.objective == "accuracy" else ""))
        if cfg.objective in ("loss", "perplexity") and cfg.objective_mode != "min":
            raise FrodCliError(f"task.objective={cfg.objective} is minimised: set task.objective_mode=min")
        self.format: Optional[str] = None if cfg.data_format == "auto" else cfg.data_format
        self.stats: Dict[str, Dict[str, int]] = {}
        self.tokenizer: Any = None

    # ------------------------------------------------------------------------------------------- data
    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def stratify_column(self) -> Optional[str]:
        return None

    def resolve_format(self, columns: Sequence[str]) -> str:
        cfg, cols = self.cfg, set(columns)
        fmt = cfg.data_format
        if fmt == "auto":
            if cfg.prompt_template:
                fmt = "template"
            elif cfg.messages_field in cols:
                fmt = "chat"
            elif cfg.instruction_field in cols and cfg.output_field in cols:
                fmt = "instruction"
            elif cfg.text_fields and cfg.text_fields[0] in cols:
                fmt = "text"
            else:
                raise FrodCliError(
                    f"causal_lm data matches no format (task.data_format=auto): no column {cfg.messages_field!r} (chat), "
                    f"{cfg.instruction_field!r}+{cfg.output_field!r} (instruction) or "
                    f"{(list(cfg.text_fields) or ['text'])[0]!r} (text), and no task.prompt_template; its columns are {sorted(cols)}"
                )
        if fmt == "text" and cfg.objective == "exact_match":
            raise FrodCliError("task.objective=exact_match needs reference answers; text data has none (use loss, objective_mode=min)")
        return fmt

    def input_columns(self) -> List[str]:
        cfg, fmt = self.cfg, self.format
        if fmt == "chat":
            return [cfg.messages_field]
        if fmt == "instruction":
            return [cfg.instruction_field, cfg.output_field]
        if fmt == "text":
            if len(cfg.text_fields) != 1:
                raise FrodCliError(f"task.data_format=text reads one column, got task.text_fields={list(cfg.text_fields)}; "
                                   "use data_format=template for prompt/response pairs")
            return [cfg.text_fields[0]]
        if fmt == "template":
            if not cfg.prompt_template or cfg.response_template is None:
                raise FrodCliError("task.data_format=template needs task.prompt_template and task.response_template")
            return list(dict.fromkeys(templates.fields(cfg.prompt_template) + templates.fields(cfg.response_template)))
        raise AssertionError(fmt)

    def _check_columns(self, raw: datasets.DatasetDict) -> None:
        need = self.input_columns()
        for split, ds in raw.items():
            missing = [c for c in need if c not in ds.column_names]
            if missing:
                what = "template field" if self.format == "template" else "column"
                raise FrodCliError(f"causal_lm ({self.format} format): split {split!r} has no {what} "
                                   f"{', '.join(map(repr, missing))}; its columns are {ds.column_names}")

    def load_data(self) -> datasets.DatasetDict:
        raw = _class_names(keep_configured_splits(load_raw(self.cfg), self.cfg))
        first = raw[self.cfg.train_split] if self.cfg.train_split in raw else next(iter(raw.values()))
        self.format = self.resolve_format(first.column_names)
        self._check_columns(raw)
        if self.cfg.dedupe:
            cols = self.input_columns()
            if self.format == "instruction" and self.cfg.input_field in first.column_names:
                cols.insert(1, self.cfg.input_field)
            raw = datasets.DatasetDict({s: dedupe(ds, cols) for s, ds in raw.items()})
        return make_splits(raw, self.cfg, self.seed, stratify_by=None)

    # ----------------------------------------------------------------------------------------- encode
    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        from frod_cli.decoding import has_chat_template, leading_special_ids

        tok = self.tokenizer = preprocessor
        first = next(iter(data.values()))
        if self.format is None:
            self.format = self.resolve_format(first.column_names)
            self._check_columns(data)
        chat = self.format == "chat" or (self.format == "instruction" and has_chat_template(tok))
        if self.format == "chat" and not has_chat_template(tok):
            raise FrodCliError("chat data needs a tokenizer with a chat template (tokenizer.chat_template is not set)")
        encoder = _Encoder(self.cfg, self.format, tok, chat, leading_special_ids(tok))
        keys = ("input_ids", "labels", "prompt_len", "prompt", "reference", "has_reference", "_status")
        blank = {"input_ids": [], "labels": [], "prompt_len": 0, "prompt": "", "reference": "", "has_reference": False}

        def fn(batch: Dict[str, list]) -> Dict[str, list]:
            out: Dict[str, list] = {k: [] for k in keys}
            for vals in zip(*batch.values()):
                ex = {**blank, **encoder(dict(zip(batch, vals)))}
                for k in keys:
                    out[k].append(ex[k])
            return out

        feats = datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
            "prompt_len": datasets.Value("int32"), "prompt": datasets.Value("string"), "reference": datasets.Value("string"),
            "has_reference": datasets.Value("bool"), "_status": datasets.Value("int8"),
        })
        out = {}
        for split, ds in data.items():
            enc = ds.map(fn, batched=True, remove_columns=ds.column_names, features=feats, desc=f"tokenizing {split}")
            counts = np.bincount(np.asarray(enc["_status"], dtype=np.int64), minlength=4)
            n, max_len = len(enc), int(self.cfg.max_length)
            self.stats[split] = {"examples": n, "kept": int(counts[_OK] + counts[_TRUNCATED]), "truncated": int(counts[_TRUNCATED]),
                                 "dropped": int(counts[_DROPPED]), "no_assistant_turn": int(counts[_NO_ASSISTANT])}
            if counts[_OK] + counts[_TRUNCATED] == 0:
                if counts[_DROPPED]:
                    raise FrodCliError(f"every example of split {split!r} is too long: the prompt alone fills task.max_length="
                                       f"{max_len} ({n} examples); raise task.max_length")
                raise FrodCliError(f"split {split!r} has no example with an assistant turn ({n} conversations)")
            if counts[_TRUNCATED] or counts[_DROPPED] or counts[_NO_ASSISTANT]:
                log.warning("causal_lm split %r: %d of %d examples truncated to task.max_length=%d, %d dropped "
                            "(prompt alone fills max_length)%s", split, counts[_TRUNCATED], n, max_len, counts[_DROPPED],
                            f", {counts[_NO_ASSISTANT]} dropped (no assistant turn)" if counts[_NO_ASSISTANT] else "")
            else:
                log.info("causal_lm split %r: %d examples, none longer than task.max_length=%d", split, n, max_len)
            if len(enc) > self.stats[split]["kept"]:
                enc = enc.filter(lambda s: [v in (_OK, _TRUNCATED) for v in s], input_columns="_status", batched=True)
            enc = enc.remove_columns("_status")
            if split == "train" and self.cfg.packing:
                enc = pack(enc, max_len)
                log.info("causal_lm: packed %d train examples into %d blocks of at most %d tokens",
                         self.stats[split]["kept"], len(enc), max_len)
            out[split] = enc
        return datasets.DatasetDict(out)

    # ---------------------------------------------------------------------------------------- batches
    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        from frod_cli.decoding import pad_id_of

        self.tokenizer = preprocessor
        pad_id = pad_id_of(preprocessor)

        def collate_fn(features: list) -> Dict[str, torch.Tensor]:
            width = max(len(f["input_ids"]) for f in features)
            packed = "position_ids" in features[0]
            ids = torch.full((len(features), width), pad_id, dtype=torch.long)
            labels = torch.full((len(features), width), -100, dtype=torch.long)
            other = torch.zeros((len(features), width), dtype=torch.long)  # attention_mask, or position_ids
            for i, f in enumerate(features):  # right padding
                n = len(f["input_ids"])
                ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
                labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
                if packed:
                    other[i, :n] = torch.as_tensor(f["position_ids"], dtype=torch.long)
                    other[i, n:] = torch.arange(width - n)  # padding: one more "document", all labels -100
                else:
                    other[i, :n] = 1
            return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): other}

        return collate_fn

    def model_inputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The model's inputs from a batch (no labels): what the loss, the metrics and the merge check feed it."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        inputs["use_cache"] = False  # a cache object would also switch off the packed-sequence mask
        return inputs

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.model_inputs(model, batch), labels=batch["labels"]).loss

    def token_stats(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per example: (summed response-token cross-entropy, response tokens, correctly predicted tokens)."""
        logits = model(**self.model_inputs(model, batch)).logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(logits.device)
        mask = target != -100
        ce = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none") * mask
        correct = (logits.argmax(-1) == target) & mask
        return ce.sum(-1), mask.sum(-1).float(), correct.sum(-1).float()

    def predict(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(correct response tokens, response tokens) per example: compute_metrics turns them into token_accuracy."""
        _, count, correct = self.token_stats(model, batch)
        return correct, count

    def compute_metrics(self, predictions: Any, references: Any) -> Dict[str, float]:
        total = float(np.sum(references))
        return {"token_accuracy": float(np.sum(predictions)) / total if total else 0.0}

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module, dataset: Any, loader: Any,
                 accelerator: Any) -> Tuple[Dict[str, float], Optional[List[Dict[str, Any]]]]:
        totals = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for batch in loader:
                stats = self.token_stats(model, batch)
                stats = accelerator.gather_for_metrics(tuple(s.contiguous() for s in stats))
                totals += torch.stack([s.double().sum().cpu() for s in stats])
        ce, count, correct = totals.tolist()
        loss = ce / count if count else float("nan")
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = float("inf")
        metrics = {"loss": loss, "perplexity": ppl, "token_accuracy": correct / count if count else 0.0}
        records = self.generate_records(model, dataset, accelerator)
        if records is None:
            return metrics, None
        metrics.update(self.score(records))
        return metrics, records

    def generation_indices(self, dataset: Any) -> List[int]:
        """The examples generated for a split: the first max_examples (0 = all) that have a reference, in order."""
        if "has_reference" not in dataset.column_names:
            return []
        idx = [i for i, ok in enumerate(dataset["has_reference"]) if ok]
        n = int(self.cfg.generation.max_examples)
        return idx[:n] if n > 0 else idx

    def generate_records(self, model: torch.nn.Module, dataset: Any, accelerator: Any) -> Optional[List[Dict[str, Any]]]:
        from accelerate.utils import gather_object

        from frod_cli.decoding import generate_texts, sampling_settings

        idx = self.generation_indices(dataset)
        if not idx:
            return None
        if self.tokenizer is None:
            raise RuntimeError("causal_lm evaluate() needs the tokenizer: call encode() or collate() first")
        world, rank = accelerator.num_processes, accelerator.process_index
        per = -(-len(idx) // world)
        mine = idx[rank * per : (rank + 1) * per]  # contiguous shards: gathering keeps the split's order
        # Every rank generates the same number of batches (sharded weights: FSDP needs each rank in every
        # forward), so a short share is padded with copies of the first example and those are dropped after.
        real = len(mine)
        mine = mine + [idx[0]] * (per - real) if world > 1 else mine
        g, tok = self.cfg.generation, self.tokenizer
        records: List[Dict[str, Any]] = []
        if mine:
            rows = dataset.select(mine)
            prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_len"])]
            texts = generate_texts(accelerator.unwrap_model(model), tok, prompts, batch_size=int(g.batch_size),
                                   **sampling_settings(g))
            for i, prompt, ref, prediction in zip(mine, rows["prompt"], rows["reference"], texts):
                extracted, ref_answer = self.extract(prediction), self.extract(ref)
                records.append({"index": int(i), "prompt": prompt, "prediction": prediction, "extracted": extracted,
                                "reference": ref, "reference_answer": ref_answer,
                                "correct": bool(normalize_answer(ref_answer)) and normalize_answer(extracted) == normalize_answer(ref_answer)})
        records = records[:real]
        return list(gather_object(records)) if world > 1 else records

    def score(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        """exact_match (and accuracy over task.labels) of generation records."""
        refs = [normalize_answer(r["reference_answer"]) for r in records]
        # A reference the answer rule finds nothing in cannot be matched: its prediction gets a value no answer has.
        preds = [normalize_answer(r["extracted"]) if ref else "\x00" for r, ref in zip(records, refs)]
        unscorable = sum(1 for ref in refs if not ref)
        if unscorable:
            log.warning("causal_lm: task.answer_pattern=%s finds no answer in %d of %d references (scored as wrong)",
                        self.cfg.answer_pattern, unscorable, len(refs))
        out = {"exact_match": metrics_lib.compute(["exact_match"], preds, refs)["exact_match"]}
        if self.cfg.labels:
            names = [normalize_answer(x) for x in self.cfg.labels]
            pred_ids = [names.index(p) if p in names else -1 for p in preds]
            ref_ids = [names.index(r) if r in names else -2 for r in refs]
            if -2 in ref_ids:
                log.warning("causal_lm: %d references are not among task.labels", ref_ids.count(-2))
            out["accuracy"] = metrics_lib.compute(["accuracy"], pred_ids, ref_ids)["accuracy"]
        return out


def _class_names(raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """Class-label columns as their names: a template renders "positive", not 2."""
    out = {}
    for split, ds in raw.items():
        for col, feat in ds.features.items():
            if isinstance(feat, datasets.ClassLabel):
                names = feat.names
                ds = ds.map(lambda ex, c=col: {c: names[ex[c]] if ex[c] is not None and ex[c] >= 0 else None},
                            features=datasets.Features({**ds.features, col: datasets.Value("string")}))
        out[split] = ds
    return datasets.DatasetDict(out)


def pack(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Whole examples, in order, into blocks of at most max_length tokens, with position_ids restarting
    per example and the label of each example's first token masked (see the module docstring)."""
    blocks: Dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    cur: Dict[str, list] = {k: [] for k in blocks}

    def flush() -> None:
        if cur["input_ids"]:
            for k in blocks:
                blocks[k].append(cur[k])
                cur[k] = []

    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        if len(cur["input_ids"]) + len(ids) > max_length:
            flush()
        cur["input_ids"] += list(ids)
        cur["labels"] += [-100] + list(labels[1:])
        cur["position_ids"] += list(range(len(ids)))
    flush()
    feats = datasets.Features({k: datasets.Sequence(datasets.Value("int32")) for k in blocks})
    return datasets.Dataset.from_dict(blocks, features=feats)
