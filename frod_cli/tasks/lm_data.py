"""causal_lm's data: every source read into one row schema (a conversation), mixed, split, then tokenized.

Reading (`read_source`): each source (`frod_cli.tasks.mixture`) is loaded, its layout resolved from its columns
(`layouts.resolve_format`), and every row read into the conversation schema `CONVERSATION` (turns, how many of them
are prompt, the plain prompt, raw or not, the row's tool schemas, the reference answer, the source's index, the
number and boolean cells written out as text, the row's number in its source) through `layouts.read_rows`
(malformed rows refused or counted before any model is loaded). Arrow needs one fixed schema, so a turn's tool
calls and a row's tools travel as JSON strings (frod_cli/tasks/tool_calls.py) and are decoded for the template.
Then each source's splits are made (`sources.make_splits`), and a mixture's training splits are interleaved with
the weights while its validation and test splits are concatenated (each row keeps `_source`, so evaluation
reports per source).

Tokenizing (`Encoder`, `encode_split`): a conversation becomes segments (`layouts.segments`), token ids and
labels. The long-conversation rule (`fit_turns`), for a conversation longer than task.max_length:
  - every whole trained (assistant) turn that fits is kept, the loss on each, and the conversation ends after the
    last of them (with EOS when the template does not end the turn with it): "cut at a turn boundary", its later
    turns dropped (counted: turns_dropped);
  - when not even the first trained turn fits whole, the conversation is truncated to max_length inside that turn
    ("truncated"), as long as the text before it leaves room;
  - it is dropped only when the text before its FIRST trained turn already fills max_length.
Generation is scored on the last turn kept: the prompt is everything before it, the reference that turn (its text,
then its tool calls as the built-in ChatML writes them). Per split, examples kept whole, cut, truncated, dropped
and the turns dropped are logged and kept in metrics.json (`data_counts`). Both maps carry an explicit fingerprint
(the input's, the settings, the tokenizer's content and this code's), so datasets' cache serves the next run on the
same data and settings instead of tokenizing again (data loaded from files; an in-memory source is read again
each time).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np

from frod_cli import FrodCliError

from . import layouts, tool_calls
from . import streaming as S
from .common import keep_configured_splits
from .mixture import Source, probabilities
from .sources import dedupe, fingerprint, load_raw, load_stream, make_splits, tokenizer_digest

log = logging.getLogger("frod_cli.tasks.causal_lm")

_STRING, _INT32 = datasets.Value("string"), datasets.Value("int32")
CONVERSATION = datasets.Features({
    "messages": [{k: _STRING for k in layouts.MESSAGE_KEYS}], "prompt_turns": _INT32, "plain_prompt": _STRING,
    "raw": datasets.Value("bool"), "tools": _STRING, "reference": _STRING, "_source": _INT32, "_converted": _INT32,
})
ENCODED = datasets.Features({
    "input_ids": datasets.Sequence(_INT32), "labels": datasets.Sequence(_INT32), "prompt_len": _INT32,
    "prompt": _STRING, "reference": _STRING, "has_reference": datasets.Value("bool"), "_status": datasets.Value("int8"),
    "_turns_dropped": _INT32, "_converted": _INT32, "_source": _INT32,
})


# ------------------------------------------------------------------------------------------- cache names
# The modules that shape an LM's rows: part of every cache name of its maps (sources.fingerprint)
LM_CODE = ("lm_data.py", "layouts.py", "templates.py", "tool_calls.py")


# ------------------------------------------------------------------------------------------- rows -> schema
class RowReader:
    """One source's rows in the CONVERSATION schema (layouts.read does the reading)."""

    def __init__(self, fmt: str, cfg: Any, source: int):
        self.fmt, self.cfg, self.source = fmt, layouts.plain_settings(cfg), int(source)

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        try:
            conv = layouts.read(row, self.fmt, self.cfg)
        except FrodCliError as e:  # a template that cannot be filled from this row
            raise layouts.MalformedRow(str(e)) from e
        answers = [m for m in conv.messages[conv.prompt_turns:] if m["role"] == "assistant"]
        if not answers:  # nothing to train on: found now, before any model loads
            raise layouts.MalformedRow("no assistant turn to train on" + (" in the completion" if conv.prompt_turns else ""))
        reference = "" if self.fmt == "text" else tool_calls.answer_text(answers[-1])
        return {"messages": conv.messages, "prompt_turns": conv.prompt_turns, "plain_prompt": conv.plain_prompt,
                "raw": conv.raw, "tools": conv.tools, "reference": reference, "_source": self.source,
                "_converted": conv.converted}

    def settings(self) -> Tuple:
        keys = ("data_format", "instruction_field", "input_field", "output_field", "messages_field", "conversations_field",
                "prompt_field", "completion_field", "prompt_template", "response_template", "system_prompt", "text_fields",
                "tools_field")
        return (self.fmt, self.source, [str(getattr(self.cfg, k, None)) for k in keys], sorted(layouts.role_map(self.cfg).items()))


def class_names(raw: datasets.DatasetDict) -> datasets.DatasetDict:
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


def where_of(src: Source, many: bool) -> str:
    return f"source {src.name!r} " if many else ""


def resolve(src: Source, columns: Sequence[str], many: bool, split: str) -> str:
    fmt = layouts.resolve_format(columns, src.cfg)
    layouts.check_columns(fmt, src.cfg, columns, f"{where_of(src, many)}split {split!r}")
    return fmt


def log_converted(ds: datasets.Dataset, where: str) -> int:
    """The number and boolean cells the rows of `ds` had written out as text (its `_converted` column), logged."""
    n = int(np.sum(np.asarray(ds["_converted"], dtype=np.int64))) if len(ds) else 0
    if n:
        log.info("%s: %d number or boolean cells written out as text", where, n)
    return n


def read_source(i: int, src: Source, seed: int, many: bool) -> Tuple[str, datasets.DatasetDict, Dict[str, Any]]:
    """(layout, train/validation/test in the CONVERSATION schema, what reading found) of one source."""
    cfg = src.cfg
    raw = class_names(keep_configured_splits(load_raw(cfg), cfg))
    first = cfg.train_split if cfg.train_split in raw else next(iter(raw))
    fmt = resolve(src, raw[first].column_names, many, first)
    reader, read, found = RowReader(fmt, cfg, i), {}, {}
    for split, ds in raw.items():
        layouts.check_columns(fmt, cfg, ds.column_names, f"{where_of(src, many)}split {split!r}")
        read[split], report = layouts.read_rows(ds, reader, cfg, split, features=CONVERSATION, where=where_of(src, many),
                                                fingerprint=fingerprint(ds, "read", reader.settings(), code=LM_CODE))
        found[split] = {"rows": report.rows, "malformed": report.malformed,
                        "converted": log_converted(read[split], f"{where_of(src, many)}split {split!r}")}
        if len(read[split]) == 0:
            raise FrodCliError(f"{where_of(src, many)}split {split!r} gives no example: all {report.rows} rows are "
                               "malformed (and task.skip_malformed=true dropped them)")
    if cfg.dedupe:
        read = {s: dedupe(ds, ["messages", "plain_prompt", "raw", "tools"]) for s, ds in read.items()}
    return fmt, make_splits(datasets.DatasetDict(read), cfg, seed, stratify_by=None), found


def combine(parts: List[datasets.DatasetDict], sources: List[Source], seed: int, stop: str) -> datasets.DatasetDict:
    """One source's splits as they are; a mixture's training splits interleaved with the weights (seeded), its
    validation and test splits concatenated."""
    if len(parts) == 1:
        return parts[0]
    out = {"train": datasets.interleave_datasets([p["train"] for p in parts], probabilities=probabilities(sources),
                                                 seed=int(seed), stopping_strategy=stop)}
    for split in ("validation", "test"):
        have = [p[split] for p in parts if split in p]
        if have:
            out[split] = datasets.concatenate_datasets(have)
    return datasets.DatasetDict(out)


# ---------------------------------------------------------------------------------------------- streaming
def stream_source(i: int, src: Source, many: bool) -> Tuple[str, Dict[str, Any]]:
    """(layout, {train: the lazily read training stream, validation/test: Datasets}) of one streamed source."""
    cfg, where = src.cfg, where_of(src, many)
    streams = load_stream(cfg)
    if cfg.train_split not in streams:
        raise FrodCliError(f"{where}train split {cfg.train_split!r} not found; the source has splits {list(streams)}")
    fmt = resolve(src, S.columns_of(streams[cfg.train_split]), many, cfg.train_split)
    train = S.numbered(streams[cfg.train_split])
    reader, out = RowReader(fmt, cfg, i), {}
    n_eval = cfg.max_eval_samples
    if cfg.validation_split and cfg.validation_split in streams:
        out["validation"] = S.materialize(S.numbered(streams[cfg.validation_split]), n_eval)
    else:
        out["validation"], train = S.holdout(train, n_eval, where)
    if cfg.test_split and cfg.test_split in streams:
        out["test"] = S.materialize(S.numbered(streams[cfg.test_split]), n_eval)
    for split in list(out):
        out[split], _ = layouts.read_rows(out[split], reader, cfg, split, features=CONVERSATION, where=where)
        log_converted(out[split], f"{where}split {split!r}")
    feats = datasets.Features({**CONVERSATION, "_row": datasets.Value("int64"), "_malformed": _STRING})
    guard = layouts.Guarded(reader, layouts.blank_of(feats))
    del guard.blank["_malformed"]
    train = train.map(guard, batched=True, with_indices=True, remove_columns=S.columns_of(train), features=feats)
    if cfg.max_train_samples:
        train = train.take(int(cfg.max_train_samples))
    out["train"] = train
    return fmt, out


def combine_streams(parts: List[Dict[str, Any]], sources: List[Source], seed: int, stop: str, buffer: int) -> Dict[str, Any]:
    trains = [p["train"] for p in parts]
    train = trains[0] if len(trains) == 1 else datasets.interleave_datasets(
        trains, probabilities=probabilities(sources), seed=int(seed), stopping_strategy=stop)
    out: Dict[str, Any] = {"train": S.TrainStream(train, seed, buffer, [s.name for s in sources])}
    for split in ("validation", "test"):
        have = [p[split] for p in parts if split in p]
        if have:
            out[split] = have[0] if len(have) == 1 else datasets.concatenate_datasets(have)
    return out


# ----------------------------------------------------------------------------------------------- encoding
@dataclass
class Fit:
    """What of a conversation fits max_length (`fit_turns`)."""

    status: int  # streaming.KEPT | CUT | TRUNCATED | DROPPED
    kept: int  # trained turns kept whole
    last: int  # the trained turn (counted among them, from 0) that generation is scored on: the last kept one
    pieces: List[Tuple[List[int], bool]]  # the token pieces up to that turn, which ends with EOS
    prompt_len: int  # the tokens before that turn


def fit_turns(pieces: List[Tuple[List[int], bool]], max_length: int, eos: Optional[int]) -> Fit:
    """The long-conversation rule (the module docstring) on a conversation's token pieces [(ids, trained)]: every
    whole trained turn that fits, each counted with the EOS it would end with."""
    starts, ends, total = [], [], 0
    for ids, trained in pieces:
        if trained:
            starts.append(total)
            ends.append(total + len(ids) + int(eos is not None and eos not in ids))
        total += len(ids)
    kept = sum(e <= max_length for e in ends)  # ends grow turn by turn: the turns that fit are the first ones
    if kept == len(ends):
        status = S.KEPT
    elif kept:
        status = S.CUT
    else:
        status = S.TRUNCATED if starts[0] < max_length else S.DROPPED
    last = max(kept, 1) - 1
    end = [i for i, (_, trained) in enumerate(pieces) if trained][last]
    out = list(pieces[: end + 1])
    if eos is not None and eos not in out[-1][0]:
        out[-1] = (out[-1][0] + [eos], True)
    return Fit(status, kept, last, out, starts[last])


class Encoder:
    """A CONVERSATION row -> input_ids, labels, prompt_len, prompt, reference, has_reference, _status,
    _turns_dropped, _converted, _source."""

    def __init__(self, tok: Any, max_length: int, train_on_prompt: bool, leading: Sequence[int]):
        self.tok, self.max_length, self.train_on_prompt, self.leading = tok, int(max_length), bool(train_on_prompt), list(leading)
        self.digest: Optional[str] = None

    def settings(self) -> Tuple:
        """What shapes the tokens, for the cache's name."""
        if self.digest is None:
            self.digest = tokenizer_digest(self.tok)
        return (self.digest, self.max_length, self.train_on_prompt, self.leading)

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        if row.get("_malformed"):  # a streamed row its reading found malformed: keep its reason
            raise layouts.MalformedRow(row["_malformed"])
        conv = layouts.Conversation(list(row["messages"]), int(row["prompt_turns"]), row["plain_prompt"], bool(row["raw"]),
                                    tools=row.get("tools") or "")
        segs = layouts.conversation_segments(conv, self.tok, None)
        with_template = layouts.templated(self.tok, conv.raw)
        pieces = layouts.token_segments(segs, self.tok, with_template=with_template, leading=self.leading, close=False)
        turns = layouts.trained_turns(conv.messages, ("assistant",), conv.prompt_turns)
        turns = turns if with_template else turns[-1:]  # a plain rendering trains the last turn only
        fit = fit_turns(pieces, self.max_length, self.tok.eos_token_id)
        ids: List[int] = []
        labels: List[int] = []
        for piece, trained in fit.pieces:
            ids += piece
            labels += piece if (trained or self.train_on_prompt) else [-100] * len(piece)
        lead = 0 if with_template else len(self.leading)
        labels[:lead] = [-100] * lead  # a plain prompt's BOS: never a target
        if fit.status == S.TRUNCATED:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        before = [i for i, (_, trained) in enumerate(segs) if trained][fit.last]  # the scored turn's segment
        reference = str(row["reference"] or "") if fit.last == len(turns) - 1 else \
            tool_calls.answer_text(conv.messages[turns[fit.last]])
        return {"input_ids": ids, "labels": labels, "prompt_len": fit.prompt_len, "prompt": "".join(t for t, _ in segs[:before]),
                "reference": reference, "has_reference": bool(reference.strip()), "_status": fit.status,
                "_turns_dropped": 0 if fit.status == S.DROPPED else len(turns) - max(fit.kept, 1),
                "_converted": int(row.get("_converted") or 0), "_source": int(row["_source"])}


def encode_split(ds: datasets.Dataset, encoder: Encoder, cfg: Any, split: str) -> Tuple[datasets.Dataset, Dict[str, int]]:
    """(the kept examples of one split, its counts); refuses a split in which no example is left."""
    enc, report = layouts.read_rows(ds, encoder, cfg, split, features=ENCODED, desc=f"tokenizing {split}",
                                    fingerprint=fingerprint(ds, "encode", encoder.settings(), code=LM_CODE))
    status = np.bincount(np.asarray(enc["_status"], dtype=np.int64), minlength=4)
    n, max_len = report.rows, encoder.max_length
    stats = {"examples": n, "kept": int(len(enc) - status[S.DROPPED]), "whole": int(status[S.KEPT]),
             "cut": int(status[S.CUT]), "truncated": int(status[S.TRUNCATED]), "dropped": int(status[S.DROPPED]),
             "turns_dropped": int(np.sum(np.asarray(enc["_turns_dropped"], dtype=np.int64))) if len(enc) else 0,
             "malformed": report.malformed}
    if stats["kept"] == 0:
        if status[S.DROPPED]:
            raise FrodCliError(f"every example of split {split!r} is too long: the text before its first trained turn "
                               f"fills task.max_length={max_len} ({n} examples); raise task.max_length")
        raise FrodCliError(f"split {split!r} has no example left to train or evaluate on ({n} rows)")
    if stats["whole"] < len(enc):
        log.warning("causal_lm split %r: %d of %d examples longer than task.max_length=%d: %d cut at a turn boundary, "
                    "%d truncated inside their first trained turn (%d later assistant turns left out in all), %d "
                    "dropped (the text before their first trained turn fills max_length)", split,
                    len(enc) - stats["whole"], n, max_len, stats["cut"], stats["truncated"], stats["turns_dropped"],
                    stats["dropped"])
    else:
        log.info("causal_lm split %r: %d examples, none longer than task.max_length=%d", split, n, max_len)
    if status[S.DROPPED]:
        enc = enc.filter(lambda s: [v != S.DROPPED for v in s], input_columns="_status", batched=True)
    return enc.remove_columns(["_status", "_turns_dropped", "_converted", "_row"]), stats


# ------------------------------------------------------------------------------------------------ packing
def pack_block(examples: List[Dict[str, Any]]) -> Dict[str, List[int]]:
    """Whole examples as one block: position_ids restart at 0 for each, and each example's first label is -100
    (it would be predicted from the previous example)."""
    block: Dict[str, List[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        ids = list(ex["input_ids"])
        block["input_ids"] += ids
        block["labels"] += [-100] + list(ex["labels"][1:])
        block["position_ids"] += list(range(len(ids)))
    return block


def pack(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Whole examples, in order, into blocks of at most max_length tokens (see the causal_lm module docstring)."""
    blocks: Dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    group: List[Dict[str, Any]] = []
    size = 0

    def flush() -> None:
        if group:
            for k, v in pack_block(group).items():
                blocks[k].append(v)
            group.clear()

    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        if size + len(ids) > max_length:
            flush()
            size = 0
        group.append({"input_ids": ids, "labels": labels})
        size += len(ids)
    flush()
    feats = datasets.Features({k: datasets.Sequence(_INT32) for k in blocks})
    return datasets.Dataset.from_dict(blocks, features=feats)
