"""Streaming (`task.streaming=true`): the training split is read and tokenized while training, never held whole.

The sources are opened with datasets' streaming mode (Hub or local files; an offline source is streamed from
memory). A source's named validation and test splits are read up front (at most task.max_eval_samples rows
each); a source without a validation split holds out its first task.max_eval_samples rows of train, or its first
DEFAULT_HOLDOUT (100) rows when that is not set (logged: a stream has no length to take a fraction of, as the
non-streaming path does); a stream that ends within them is refused (no row would be left to train on). The training rows of every source are read (`layouts`),
mixed (`task.mixture`, through `interleave_datasets` on the streams), shuffled in a buffer of
task.shuffle_buffer rows seeded by (train.seed, pass), tokenized lazily and, with task.packing, packed into
blocks as they come. A pass that ends starts the next one (reshuffled); train.max_steps says when to stop.

Resume is exact by position: the loop records, after every optimizer step, the pass and the number of rows of
that pass read for the examples it has consumed (a packed block ends before the row that did not fit it). A
resumed run reopens the stream, replays the same seeded shuffle, skips that many rows before they are
tokenized and yields the same examples from there. Malformed rows refuse the run when they are met (task.
skip_malformed=true drops and counts them); rows dropped for length are counted; both counts, and the
examples each source gave, travel with the position and end up in metrics.json.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from frod_cli import FrodCliError

log = logging.getLogger("frod_cli.tasks.causal_lm")

# An encoded example's `_status` (the long-conversation rule, frod_cli/tasks/lm_data.py): kept whole, truncated
# inside its first trained turn, dropped (the text before its first trained turn fills max_length), cut at a turn
# boundary (its later assistant turns dropped)
KEPT, TRUNCATED, DROPPED, CUT = 0, 1, 2, 3
COUNTS = ("rows", "malformed", "cut", "truncated", "dropped", "turns_dropped", "converted", "examples")
DEFAULT_HOLDOUT = 100  # rows of a stream held out for validation when it has no validation split


def columns_of(stream: Any) -> List[str]:
    """The columns of an IterableDataset (read off its first row when its features are not known yet)."""
    if stream.column_names:
        return list(stream.column_names)
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise FrodCliError("a streamed split holds no row")
    return list(first)


def materialize(stream: Any, n: Optional[int]) -> Any:
    """The first n rows (all when n is None) of a stream, as an in-memory Dataset."""
    import datasets

    rows = list(stream.take(int(n)) if n is not None else stream)
    if not rows:
        raise FrodCliError("a streamed evaluation split holds no row")
    return datasets.Dataset.from_list(rows, features=stream.features)


def holdout(stream: Any, n: Optional[int], where: str) -> Tuple[Any, Any]:
    """(the first n rows as a Dataset, the stream after them): a validation split carved out of a stream; n is
    task.max_eval_samples, DEFAULT_HOLDOUT when it is not set."""
    if n is not None and int(n) <= 0:
        raise FrodCliError(f"task.max_eval_samples must be positive, got {n}")
    why = "task.max_eval_samples" if n is not None else "the default; task.max_eval_samples=N holds out another number"
    n = DEFAULT_HOLDOUT if n is None else int(n)
    held = materialize(stream, n)
    rest = stream.skip(n)
    if len(held) < n or next(iter(rest.take(1)), None) is None:
        raise FrodCliError(f"{where or 'the training stream '}has no validation split, and it holds {len(held)} "
                           f"rows: holding out the first {n} for validation leaves none to train on; set "
                           "task.max_eval_samples to fewer, or give a validation file (task.data_files.validation=...)")
    log.info("%s: no validation split: its first %d training rows are held out for validation (%s)",
             where.strip() or "the training stream", n, why)
    return held, rest


def numbered(stream: Any) -> Any:
    """The stream with `_row`: each row's number in its source (counted from 0), for refusals."""
    return stream.map(lambda row, i: {"_row": i}, with_indices=True)


class TrainStream:
    """The training rows of a streamed run, before tokenizing: `rows(pass, start)` replays a pass from a position."""

    def __init__(self, rows: Any, seed: int, buffer: int, sources: List[str]):
        self.base, self.seed, self.buffer, self.sources = rows, int(seed), int(buffer), list(sources)

    def rows(self, epoch: int, start: int, encode: Optional[Callable] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """(position in the pass, row) from row `start` of pass `epoch`; `encode` (a batched map function) is
        applied after the skip, so skipped rows are never tokenized."""
        ds = self.base
        if self.buffer > 0:
            ds = ds.shuffle(seed=self.seed * 1_000_003 + int(epoch), buffer_size=self.buffer)
        if start:
            ds = ds.skip(int(start))
        if encode is not None:
            ds = ds.map(encode, batched=True, batch_size=64, with_indices=True,  # a first batch soon after the start
                        remove_columns=list(ds.column_names or []) or None)
        for k, row in enumerate(ds):
            yield int(start) + k, row


class ExampleStream:
    """Encoded training examples of a TrainStream, with drops counted and, with packing, packed into blocks.
    `examples(pass, start)` yields (next position, example, counts): where reading resumes after this example,
    and what the rows read for it added to the counts (rows, malformed, truncated, dropped, examples per source)."""

    def __init__(self, train: TrainStream, encode: Callable, skip_malformed: bool,
                 pack: Optional[Callable[[List[Dict[str, Any]]], Dict[str, Any]]] = None, max_length: int = 0):
        self.train, self.encode, self.skip_malformed = train, encode, bool(skip_malformed)
        self.pack, self.max_length = pack, int(max_length)
        self.sources = train.sources

    def _kept(self, epoch: int, start: int) -> Iterator[Tuple[int, Optional[Dict[str, Any]], Dict[str, int]]]:
        """(next position, example or None for a dropped row, counts of this row)."""
        for pos, row in self.train.rows(epoch, start, self.encode):
            counts = {"rows": 1}
            if row.get("_malformed"):
                if not self.skip_malformed:
                    raise FrodCliError(f"{self._where(row)}training stream, row {int(row['_row']) + 1}: "
                                       f"{row['_malformed']} (fix it, or task.skip_malformed=true drops such rows)")
                counts["malformed"] = 1
                yield pos + 1, None, counts
                continue
            status = int(row["_status"])
            counts["converted"] = int(row.get("_converted") or 0)
            if status == DROPPED:
                counts["dropped"] = 1
                yield pos + 1, None, counts
                continue
            counts["truncated"], counts["cut"] = int(status == TRUNCATED), int(status == CUT)
            counts["turns_dropped"] = int(row.get("_turns_dropped") or 0)
            counts["examples"] = 1
            counts[f"source:{int(row.get('_source', 0))}"] = 1
            yield pos + 1, row, counts

    def _where(self, row: Dict[str, Any]) -> str:
        return f"source {self.sources[int(row.get('_source', 0))]!r} " if len(self.sources) > 1 else ""

    def examples(self, epoch: int, start: int) -> Iterator[Tuple[int, Dict[str, Any], Dict[str, int]]]:
        pending: Dict[str, int] = {}
        block: List[Dict[str, Any]] = []
        block_counts: Dict[str, int] = {}
        block_len, block_end = 0, start
        for nxt, ex, counts in self._kept(epoch, start):
            if ex is None:
                add_counts(pending, counts)
                continue
            if self.pack is None:
                add_counts(pending, counts)
                yield nxt, ex, pending
                pending = {}
                continue
            n = len(ex["input_ids"])
            if block and block_len + n > self.max_length:
                yield block_end, self.pack(block), block_counts
                block, block_counts, block_len = [], {}, 0
            add_counts(block_counts, pending)
            add_counts(block_counts, counts)
            pending = {}
            block.append(ex)
            block_len, block_end = block_len + n, nxt
        if block:
            add_counts(block_counts, pending)
            yield block_end, self.pack(block), block_counts


def add_counts(into: Dict[str, int], more: Dict[str, int]) -> Dict[str, int]:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)
    return into


def stream_summary(counts: Dict[str, int], sources: List[str]) -> Dict[str, Any]:
    """The counts a streamed run kept with its position, for metrics.json."""
    out = {k: int(counts.get(k, 0)) for k in COUNTS}
    out["source_examples"] = {name: int(counts.get(f"source:{i}", 0)) for i, name in enumerate(sources)}
    return out

