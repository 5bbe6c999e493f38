"""The loop's checkpoints: what `resume=<run dir>` continues from (training/checkpoint.py holds the files' format;
sharded trainables, method=full under FSDP, go through training/sharded.py). `loop` is the training recipe."""
from __future__ import annotations

from typing import Any, Dict

import torch

from frod_cli import FrodCliError
from frod_cli.training import checkpoint as ck
from frod_cli.training import preflight
from frod_cli.training import sharded as S
from frod_cli.training.state import TrainState


def load(loop: Any, path: str) -> Dict[str, Any]:
    """Continue from checkpoints/step-N/: trainables, optimizer, scheduler, the strategy's state, TrainState (read
    only: metrics.jsonl is cut back to what it held then when the run is accepted). Returns the saved RNG states
    (set just before training)."""
    saved = S.with_shards(ck.load_checkpoint(path), loop.unwrapped, loop.optimizer, loop.acc)
    missing = set(loop.trainable_names) - set(saved["trainable"])
    if missing:
        raise FrodCliError(f"checkpoint {path} does not fit this model: no values for {sorted(missing)[:3]}")
    st = TrainState.from_dict(saved["state"])
    if st.num_processes != loop.acc.num_processes:
        raise FrodCliError(f"checkpoint {path} was written by {st.num_processes} processes; resume it with "
                           f"the same number (this launch has {loop.acc.num_processes})")
    loop.restore(saved["trainable"])
    loop.optimizer.load_state_dict(saved["optimizer"])
    loop.scheduler.load_state_dict(saved["scheduler"])
    loop.step.load_state_dict(saved["strategy"])
    loop.state, loop.best_values, loop.last_ckpt = st, saved["best"], path
    loop.writer.resume_predictions()
    if loop.main:
        loop.window_loss += torch.tensor(st.window_loss, device=loop.acc.device)
    return saved["rng"]


def save(loop: Any) -> None:
    """checkpoints/step-N/ of the current step (every process takes part; the main process writes)."""
    acc, st = loop.acc, loop.state
    win = acc.reduce(loop.window_loss.clone(), reduction="sum") if acc.num_processes > 1 else loop.window_loss
    # sharded trainables (method=full under FSDP): every process stages its shards, rank 0 moves them in
    trainable, best, optimizer_sd, extra = S.checkpoint_parts(
        loop.unwrapped, loop.snapshot(), loop.best_values, loop.optimizer.state_dict(), loop.output_dir, st.step, acc)
    if loop.main:
        st.window_loss = [float(x) for x in win.tolist()]
        st.jsonl_bytes = loop.writer.log_bytes()
        loop.last_ckpt = ck.save_checkpoint(
            loop.output_dir, st.step, trainable=trainable, best=best, optimizer_sd=optimizer_sd,
            scheduler_sd=loop.scheduler.state_dict(), state=st.to_dict(), config=preflight.plain_config(loop.cfg),
            strategy=loop.step.state_dict(), extra=extra)
    acc.wait_for_everyone()
