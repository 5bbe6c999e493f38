"""merged/ at the end of a run, and the merge check: the largest |merged - unmerged| output on the first validation
examples (metrics.json's merge_max_abs_diff). `loop` is the training recipe (frod_cli/training/recipe.py)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch

from frod_cli.training import builders as B
from frod_cli.training import sharded as S
from frod_cli.training.dtypes import model_dtype
from frod_cli.training.evaluation import check_batch, merge_and_check, model_outputs, save_merged

log = logging.getLogger("frod.train")


def write_merged(loop: Any) -> Optional[float]:
    """merged/ and the merge check's difference (None on a process that did not compute it)."""
    batch = check_batch(loop.encoded["validation"], loop.collate, min(8, int(loop.tc.eval_batch_size)),
                        loop.acc.device)
    if loop.sharded:
        return write_merged_sharded(loop, batch)
    if not loop.main:
        return None
    plain = loop.acc.unwrap_model(loop.model, keep_fp32_wrapper=False)
    merged, diff = merge_and_check(loop.method, plain, batch, loop.task)
    save_merged(merged, loop.preprocessor, str(loop.paths.merged), dtype=model_dtype(loop.cfg.model))
    return diff


def write_merged_sharded(loop: Any, batch: Dict[str, Any]) -> Optional[float]:
    """merged/ of a sharded run. The weights exist only as shards, so rank 0 rebuilds the model on CPU: the base as
    loaded at the start (frozen since) plus the adapter of the current values (basis and pattern read back, not
    recomputed; FRoD checks the base's fingerprint), merges and writes that. The merge check compares the merged
    model with the sharded model's own outputs (every rank runs that forward: it gathers the weights)."""
    loop.model.eval()
    with torch.no_grad():
        trained = model_outputs(loop.model, batch, loop.task).cpu()
    diff = None
    plain = rebuild_on_cpu(loop)  # every process takes part (sharded trainables are gathered)
    if loop.main:
        cpu_batch = B.to_device(batch, torch.device("cpu"))
        with torch.no_grad():
            rebuilt = model_outputs(plain, cpu_batch, loop.task)
            merged = loop.method.merge(plain)
            merged.eval()
            after = model_outputs(merged, cpu_batch, loop.task)
        log.info("train.fsdp: merged/ rebuilt on CPU; max |rebuilt - sharded| output %.3g",
                 float((rebuilt - trained).abs().max()))
        save_merged(merged, loop.preprocessor, str(loop.paths.merged), dtype=model_dtype(loop.cfg.model))
        diff = float((after - trained).abs().max())
    loop.acc.wait_for_everyone()
    return diff


def rebuild_on_cpu(loop: Any) -> Optional[torch.nn.Module]:
    """The trained model, unsharded, on rank 0's CPU (None elsewhere): the base loaded as in setup + an adapter of
    the current values (gathered from the shards where they are sharded)."""
    import tempfile

    cfg = loop.cfg
    with tempfile.TemporaryDirectory(prefix="frod-merge-") as d:
        adapter = os.path.join(d, "adapter")
        S.save_adapter(loop.method, loop.unwrapped, adapter, loop.main, lambda path, fill: fill(path))
        if not loop.main:
            return None
        model, _, _ = B.load_adapted(cfg.model, cfg.method, loop.task, int(loop.tc.seed), adapter)
    return model.eval()
