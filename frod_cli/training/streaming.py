"""The loop's side of `task.streaming=true`: optimizer-step windows of micro-batches drawn from a task's example
stream (an object with `examples(pass, start)` and `sources`, e.g. frod_cli.tasks.streaming.ExampleStream),
and the stream's position kept in TrainState.stream so that a resumed run continues exactly.

Every process reads the whole stream and takes its own slice of each global batch (train.batch_size examples per
process), so the examples a step trains on do not depend on how fast a process reads. After each window, the
state holds {epoch: the pass, position: the rows of that pass read for the examples consumed so far, counts: what
those rows gave}; a checkpoint saves it with the step, and a resumed run restarts the stream there (a pass that
ends starts the next one, reshuffled). A stream with no example in a whole pass is refused (nothing to train on).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List

from frod_cli import FrodCliError


def is_stream(train_set: Any) -> bool:
    return hasattr(train_set, "examples") and not hasattr(train_set, "__len__")


def check_config(cfg: Any) -> None:
    """What a streamed run needs from train.*: a step count (a stream has no length to make epochs of) and the
    main process reading (its position is the resume point)."""
    if int(cfg.train.max_steps) <= 0:
        raise FrodCliError("task.streaming=true needs train.max_steps (a stream has no length to count epochs in)")
    if int(cfg.train.num_workers) != 0:
        raise FrodCliError("task.streaming=true reads the stream in the training process: set train.num_workers=0")


class StreamBatches:
    """Windows of `ga` micro-batches for this process, from a task's example stream."""

    def __init__(self, stream: Any, batch_size: int, ga: int, num_processes: int, rank: int, collate: Callable):
        self.stream, self.batch_size, self.ga = stream, int(batch_size), int(ga)
        self.world, self.rank, self.collate = int(num_processes), int(rank), collate

    def _items(self, state: Dict[str, Any]) -> Iterator[Any]:
        """(next position, example, counts) from where `state` stands, pass after pass; updates state['epoch']."""
        epoch, start = int(state.get("epoch", 0)), int(state.get("position", 0))
        while True:
            got = 0
            for item in self.stream.examples(epoch, start):
                got += 1
                yield epoch, item
            if got == 0 and start == 0:
                raise FrodCliError("the training stream holds no example: every row was dropped or malformed")
            epoch, start = epoch + 1, 0

    def windows(self, state: Dict[str, Any]) -> Iterator[List[Dict[str, Any]]]:
        """One optimizer step's micro-batches at a time; `state` (TrainState.stream) is updated before each
        window is handed out, so a checkpoint after that step resumes right after it."""
        from frod_cli.tasks.streaming import add_counts

        state.setdefault("epoch", 0)
        state.setdefault("position", 0)
        state.setdefault("counts", {})
        items = self._items(state)
        per_window = self.batch_size * self.world * self.ga
        while True:
            taken = [next(items) for _ in range(per_window)]
            for epoch, (position, _, counts) in taken:
                state["epoch"], state["position"] = epoch, position
                add_counts(state["counts"], counts)
            examples = [ex for _, (_, ex, _) in taken]
            yield [self.collate(self._mine(examples, j)) for j in range(self.ga)]

    def _mine(self, examples: List[Dict[str, Any]], micro: int) -> List[Dict[str, Any]]:
        """This process's slice of micro-batch `micro` of the window."""
        start = micro * self.batch_size * self.world + self.rank * self.batch_size
        return examples[start:start + self.batch_size]


def summary(state: Dict[str, Any], sources: List[str]) -> Dict[str, Any]:
    """metrics.json's account of a streamed run: passes begun, rows read, what was dropped, examples per source."""
    from frod_cli.tasks.streaming import stream_summary

    return {"passes": int(state.get("epoch", 0)) + 1, "position": int(state.get("position", 0)),
            **stream_summary(state.get("counts", {}), sources)}
