"""Instruction / chat fine-tuning of a causal LM (AutoModelForCausalLM), evaluated by loss and generation.

Data (`task.source` hub | local csv/json/jsonl/parquet | offline, e.g. `offline` + `sft_tiny`, or a weighted
`task.mixture` of such sources, frod_cli/tasks/mixture.py); a missing validation/test split is carved out of train
(seeded, not stratified). Rows are read by the one reader of layouts, frod_cli/tasks/layouts.py (`task.data_format`
instruction | chat | sharegpt | prompt_completion | text | template | auto; its docstring says what each reads),
into conversations, then tokenized (frod_cli/tasks/lm_data.py; cached by datasets for the next run on the same
data and settings). In short:
  instruction        without a chat template, the plain layout
                         [system_prompt\\n\\n]### Instruction:\\n<instruction>\\n\\n[### Input:\\n<input>\\n\\n]### Response:\\n
                     and the response <output> + EOS; with one, one user turn and one assistant turn, like chat.
  chat, sharegpt     turns rendered with the tokenizer's chat template (refused without one: task.chat_template=chatml
                     gives it one); task.system_prompt becomes a system turn when the conversation has none. Loss on
                     the assistant turns only (each turn's text as the template renders it, end-of-turn markup
                     included; tool calls too, never tool outputs); EOS appended to the last one unless the
                     template already put it there. Turns after the last assistant turn are dropped. For generation
                     the prompt is everything before the last assistant turn kept with the generation prompt, the
                     reference that turn.
  prompt_completion  strings: prompt and completion as they are (TRL's rule: no template); message lists: through the
                     template, loss on the completion's assistant turns.
  text               task.text_fields[0] (one column): plain documents, loss on every token, EOS appended;
                     no generation (there is no reference answer), only loss and perplexity.
  template           task.prompt_template and task.response_template: format strings over any columns
                     ("Q: {question}\\nA:", " {answer}"; frod_cli.tasks.templates, so `{choices!l}` lists work);
                     task.system_prompt, when set, is a first paragraph.
Every layout rendered without a chat template puts the tokenizer's leading special tokens (BOS) before the prompt;
chat templates carry their own. Prompt and response are tokenized separately and concatenated, and generation
starts from exactly the prompt tokens used in training. A row that cannot be read (a missing field, a turn
without content, a role not in task.role_map, a conversation the template cannot render) refuses its split in one
line naming the first such row and the count; task.skip_malformed=true drops them with a count instead.

Labels: the prompt's labels are -100 (`task.train_on_prompt=false`, the default) so the loss covers the
response (+ EOS) only. An example longer than `task.max_length` keeps every whole assistant turn that fits (cut
at a turn boundary), is truncated on the right inside its first assistant turn when not even that fits, and is
dropped only when the text before its first assistant turn fills max_length (frod_cli/tasks/lm_data.py states
the rule). The counts are logged per split (and kept in metrics.json under `data_counts`), and a split in which
every example is dropped is refused.

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

Streaming (`task.streaming=true`, frod_cli/tasks/streaming.py): the training split is read, tokenized and
packed while training; the loop's side is frod_cli/training/streaming.py.

Evaluation (`evaluate`): the token-weighted mean cross-entropy over the response tokens (`loss`), its
`perplexity` = exp(loss) and `token_accuracy` (argmax next-token accuracy on the same tokens), gathered
over processes; then greedy generation (`task.generation.*`) for the first `task.generation.max_examples`
examples of the split that have a reference (0 = all; with a mixture, of each source), with left padding. The answer is read off the new
tokens with `task.answer_pattern` (frod_cli.tasks.answers; the same rule on the reference) and scored with
`exact_match` on the normalised strings, plus `accuracy` over task.labels when they are set (an answer that
is not a label is wrong). Records {index, prompt, prediction, extracted, reference, reference_answer,
correct} are gathered to every process. Generation runs on the unwrapped model, a contiguous share of
the examples per process; every process runs as many batches as the largest share (a short share is padded
and the padding dropped), so an FSDP model, whose every forward gathers weights from all ranks, generates
too (train.fsdp). With a mixture, every metric is also reported per source as `<source name>/<metric>` (the
plain names are over all sources' examples together), and each record names its source.
The default `predict`/`compute_metrics` path gives `token_accuracy` only. `task.metrics` is not read:
`task.objective` must be one of loss, perplexity (objective_mode=min), token_accuracy, exact_match, or
accuracy (with task.labels); anything else is refused when the task is built.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from frod_cli import FrodCliError

from .. import metrics as metrics_lib
from ..config import GenerationConfig
from . import layouts, lm_data, templates
from . import streaming as S
from .answers import answer_rule, normalize_answer
from .base import register_task
from .common import DataTask
from .layouts import instruction_prompt, instruction_user_turn  # noqa: F401  (frod generate's plain layout)
from .lm_data import pack  # noqa: F401
from .mixture import sources_of

log = logging.getLogger(__name__)

FORMATS = layouts.FORMATS
LOSS_METRICS = ("loss", "perplexity", "token_accuracy")


@dataclass
class CausalLMConfig(layouts.ConversationConfig):
    # Weighted mixture: a list of sources, each {name, weight, source, dataset, data_files, data_format, ...}
    # (the keys of one source; the rest inherited from this task); trained on with probabilities weight / sum
    mixture: List[Any] = field(default_factory=list)
    mixture_stop: str = "first_exhausted"  # first_exhausted | all_exhausted: when the mixture's epoch ends
    streaming: bool = False  # read and tokenize the training split while training (needs train.max_steps)
    shuffle_buffer: int = 1000  # streaming: rows in the shuffle buffer (0: the stream's own order)
    train_on_prompt: bool = False  # false: loss on the response tokens only
    packing: bool = False  # pack examples into blocks of max_length (training split only)
    # how the answer is read off a generation: full | last_number | first_word | regex:<pattern>
    answer_pattern: str = "full"
    labels: Optional[List[str]] = None  # answers that are labels: `accuracy` over them is reported too
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    objective: str = "loss"
    objective_mode: str = "min"


@register_task("causal_lm", config=CausalLMConfig)
class CausalLM(DataTask):
    auto_class = "AutoModelForCausalLM"
    default_modules_to_save = ()  # the LM head is part of the model: no new head to train
    libraries = ("evaluate",)  # exact match and accuracy of the generations (frod_cli/metrics)
    lower_is_better = ("loss", "perplexity")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from frod_cli.config import check_sampling

        super().check_config(cfg)
        if int(cfg.max_length) < 2:
            raise FrodCliError(f"task.max_length must be at least 2 for a causal LM, got {cfg.max_length}")
        if cfg.data_format not in FORMATS:
            raise FrodCliError(f"unknown task.data_format {cfg.data_format!r}; use {', '.join(FORMATS)}")
        answer_rule(cfg.answer_pattern)  # an unknown rule or a bad regex
        for tpl in (cfg.prompt_template, cfg.response_template):
            if tpl is not None:
                templates.fields(tpl)
        layouts.check_chat_template_setting(cfg.chat_template)
        check_sampling(cfg.generation, "task.generation.")
        if int(cfg.shuffle_buffer) < 0:
            raise FrodCliError(f"task.shuffle_buffer must be >= 0 (0: no shuffling), got {cfg.shuffle_buffer}")

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        self.extract = answer_rule(cfg.answer_pattern)
        self.sources = sources_of(cfg)  # refuses a bad mixture now, before any data is read
        for src in self.sources:
            if src.cfg.data_format not in FORMATS:
                raise FrodCliError(f"source {src.name!r}: unknown data_format {src.cfg.data_format!r}; use {', '.join(FORMATS)}")
            layouts.role_map(src.cfg)
        if cfg.streaming and any(s.cfg.dedupe for s in self.sources):
            raise FrodCliError("task.dedupe needs the whole data set at once: not with task.streaming=true")
        self.formats: List[Optional[str]] = [None if s.cfg.data_format == "auto" else str(s.cfg.data_format)
                                             for s in self.sources]
        self.stats: Dict[str, Dict[str, int]] = {}
        self.read_stats: Dict[str, Dict[str, Dict[str, int]]] = {}
        self.train_counts: Optional[List[int]] = None
        self.tokenizer: Any = None

    @property
    def streaming(self) -> bool:
        return bool(self.cfg.streaming)

    @property
    def format(self) -> Optional[str]:
        """The layout of the data (of the first source, for a mixture); None until the data is read."""
        return self.formats[0]

    @property
    def source_names(self) -> List[str]:
        return [s.name for s in self.sources]

    def metric_names(self) -> Optional[List[str]]:
        return list(LOSS_METRICS) + ["exact_match"] + (["accuracy"] if self.cfg.labels else [])  # accuracy: over labels

    # ------------------------------------------------------------------------------------------- data
    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def stratify_column(self) -> Optional[str]:
        return None

    def resolve_format(self, columns: Sequence[str]) -> str:
        return layouts.resolve_format(columns, self.cfg)

    def _check_references(self) -> None:
        if self.cfg.objective == "exact_match" and all(f == "text" for f in self.formats):
            raise FrodCliError("task.objective=exact_match needs reference answers; text data has none (use loss, objective_mode=min)")

    def load_data(self) -> Any:
        """train/validation/(test) in the conversation schema (lm_data.CONVERSATION); with task.streaming the
        train split is an unread stream (streaming.TrainStream)."""
        many = len(self.sources) > 1
        if self.cfg.streaming:
            parts = []
            for i, src in enumerate(self.sources):
                self.formats[i], part = lm_data.stream_source(i, src, many)
                parts.append(part)
            self._check_references()
            return lm_data.combine_streams(parts, self.sources, self.seed, self.cfg.mixture_stop, int(self.cfg.shuffle_buffer))
        parts = []
        for i, src in enumerate(self.sources):
            self.formats[i], part, self.read_stats[src.name] = lm_data.read_source(i, src, self.seed, many)
            parts.append(part)
        self._check_references()
        if many:
            self._log_mixture(parts)
        return lm_data.combine(parts, self.sources, self.seed, self.cfg.mixture_stop)

    def _log_mixture(self, parts: List[datasets.DatasetDict]) -> None:
        for src, part in zip(self.sources, parts):
            log.info("mixture source %r (%s, weight %g): %s", src.name, self.formats[self.sources.index(src)],
                     src.weight, {k: len(v) for k, v in part.items()})

    # ----------------------------------------------------------------------------------------- encode
    def encode(self, data: Any, preprocessor: Any) -> Any:
        from frod_cli.decoding import has_chat_template, leading_special_ids

        tok = self.tokenizer = preprocessor
        if any(f in ("chat", "sharegpt") for f in self.formats) and not has_chat_template(tok):
            raise FrodCliError("chat data needs a tokenizer with a chat template (tokenizer.chat_template is not set): "
                               "give it one with task.chat_template=chatml (or a Jinja string)")
        encoder = lm_data.Encoder(tok, int(self.cfg.max_length), bool(self.cfg.train_on_prompt), leading_special_ids(tok))
        out: Dict[str, Any] = {}
        for split, ds in data.items():
            if isinstance(ds, S.TrainStream):
                out[split] = self._stream(ds, encoder)
                continue
            enc, self.stats[split] = lm_data.encode_split(ds, encoder, self.cfg, split)
            if split == "train":
                self.train_counts = np.bincount(np.asarray(enc["_source"], dtype=np.int64),
                                                minlength=len(self.sources)).tolist()
                empty = [s.name for s, n in zip(self.sources, self.train_counts) if n == 0]
                if empty:
                    raise FrodCliError(f"mixture source {empty[0]!r} gives no training example (its rows were all "
                                       f"dropped, or task.mixture_stop={self.cfg.mixture_stop} ended the mixture first)")
                if self.cfg.packing:
                    enc = lm_data.pack(enc, int(self.cfg.max_length))
                    log.info("causal_lm: packed %d train examples into %d blocks of at most %d tokens",
                             self.stats[split]["kept"], len(enc), int(self.cfg.max_length))
            out[split] = enc
        return out if any(isinstance(v, S.ExampleStream) for v in out.values()) else datasets.DatasetDict(out)

    def _stream(self, train: S.TrainStream, encoder: lm_data.Encoder) -> S.ExampleStream:
        feats = datasets.Features({**lm_data.ENCODED, "_row": datasets.Value("int64"), "_malformed": datasets.Value("string")})
        guard = layouts.Guarded(encoder, layouts.blank_of(feats))
        del guard.blank["_malformed"]
        return S.ExampleStream(train, guard, bool(self.cfg.skip_malformed),
                               pack=lm_data.pack_block if self.cfg.packing else None, max_length=int(self.cfg.max_length))

    def data_stats(self) -> Dict[str, Any]:
        """What the task read, for metrics.json: per split (examples, kept, truncated, dropped, malformed) and per
        source (layout, weight, rows read and malformed per source split, training examples it gave)."""
        out: Dict[str, Any] = {"splits": self.stats, "sources": {}}
        for i, src in enumerate(self.sources):
            entry: Dict[str, Any] = {"format": self.formats[i], "weight": src.weight, "read": self.read_stats.get(src.name, {})}
            if self.train_counts is not None:
                entry["train_examples"] = int(self.train_counts[i])
            out["sources"][src.name] = entry
        if len(self.sources) > 1:
            out["mixture_stop"] = str(self.cfg.mixture_stop)
        return out

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
            batch = {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): other}
            if "_source" in features[0]:  # which source each example came from: per-source metrics
                batch["source"] = torch.tensor([int(f["_source"]) for f in features], dtype=torch.long)
            return batch

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
        """Loss, perplexity and token accuracy over the split, then generation (see the module docstring); with a
        mixture, each also per source as `<source>/<metric>`."""
        totals = torch.zeros(len(self.sources), 3, dtype=torch.float64)  # per source: cross-entropy, tokens, correct
        with torch.no_grad():
            for batch in loader:
                ce, count, correct = self.token_stats(model, batch)
                source = batch.get("source", torch.zeros(len(ce), dtype=torch.long)).to(ce.device)
                ce, count, correct, source = accelerator.gather_for_metrics(
                    tuple(t.contiguous() for t in (ce, count, correct, source)))
                totals.index_add_(0, source.long().cpu(), torch.stack([ce, count, correct], 1).double().cpu())
        metrics = _loss_metrics(totals.sum(0))
        for name, row in self._per_source(totals):
            metrics.update({f"{name}/{k}": v for k, v in _loss_metrics(row).items()})
        records = self.generate_records(model, dataset, accelerator)
        if records is None:
            return metrics, None
        metrics.update(self.score(records))
        for name, _ in self._per_source(totals):
            mine = [r for r in records if r.get("source") == name]
            if mine:
                metrics.update({f"{name}/{k}": v for k, v in self.score(mine, warn=False).items()})
        return metrics, records

    def _per_source(self, totals: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        """(name, totals) of each source with examples in the split; none for a single source."""
        if len(self.sources) < 2:
            return []
        return [(s.name, totals[i]) for i, s in enumerate(self.sources) if totals[i, 1] > 0]

    def generation_indices(self, dataset: Any) -> List[int]:
        """The examples generated for a split: the first max_examples (0 = all) that have a reference, in order;
        with a mixture, the first max_examples of each source (each source's generation metrics)."""
        if "has_reference" not in dataset.column_names:
            return []
        n = int(self.cfg.generation.max_examples)
        refs = dataset["has_reference"]
        sources = dataset["_source"] if len(self.sources) > 1 and "_source" in dataset.column_names else [0] * len(refs)
        taken: Dict[int, int] = {}
        idx = []
        for i, (ok, src) in enumerate(zip(refs, sources)):
            if ok and (n <= 0 or taken.get(src, 0) < n):
                taken[src] = taken.get(src, 0) + 1
                idx.append(i)
        return idx

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
            sources = rows["_source"] if len(self.sources) > 1 and "_source" in rows.column_names else [None] * len(mine)
            for i, prompt, ref, prediction, src in zip(mine, rows["prompt"], rows["reference"], texts, sources):
                extracted, ref_answer = self.extract(prediction), self.extract(ref)
                records.append({"index": int(i), "prompt": prompt, "prediction": prediction, "extracted": extracted,
                                "reference": ref, "reference_answer": ref_answer,
                                "correct": bool(normalize_answer(ref_answer)) and normalize_answer(extracted) == normalize_answer(ref_answer),
                                **({"source": self.sources[int(src)].name} if src is not None else {})})
        records = records[:real]
        return list(gather_object(records)) if world > 1 else records

    def score(self, records: List[Dict[str, Any]], warn: bool = True) -> Dict[str, float]:
        """exact_match (and accuracy over task.labels) of generation records."""
        refs = [normalize_answer(r["reference_answer"]) for r in records]
        # A reference the answer rule finds nothing in cannot be matched: its prediction gets a value no answer has.
        preds = [normalize_answer(r["extracted"]) if ref else "\x00" for r, ref in zip(records, refs)]
        unscorable = sum(1 for ref in refs if not ref)
        if unscorable and warn:
            log.warning("causal_lm: task.answer_pattern=%s finds no answer in %d of %d references (scored as wrong)",
                        self.cfg.answer_pattern, unscorable, len(refs))
        out = {"exact_match": metrics_lib.compute(["exact_match"], preds, refs)["exact_match"]}
        if self.cfg.labels:
            names = [normalize_answer(x) for x in self.cfg.labels]
            pred_ids = [names.index(p) if p in names else -1 for p in preds]
            ref_ids = [names.index(r) if r in names else -2 for r in refs]
            if -2 in ref_ids and warn:
                log.warning("causal_lm: %d references are not among task.labels", ref_ids.count(-2))
            out["accuracy"] = metrics_lib.compute(["accuracy"], pred_ids, ref_ids)["accuracy"]
        return out


def _loss_metrics(totals: torch.Tensor) -> Dict[str, float]:
    """loss, perplexity, token_accuracy from (summed cross-entropy, tokens, correct tokens)."""
    ce, count, correct = (float(x) for x in totals.tolist())
    loss = ce / count if count else float("nan")
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    return {"loss": loss, "perplexity": ppl, "token_accuracy": correct / count if count else 0.0}
