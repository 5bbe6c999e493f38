"""The loop's view of a sharded model's trainables: snapshots, checkpoints, adapter/ and fingerprints when FSDP
shards what trains (method=full under train.fsdp: every weight, its gradient and its AdamW state, ZeRO-3).

A trainable is then a DTensor of which each process holds a shard (`local`). The loop keeps working with values
by name, each value being what this process holds: the whole tensor for what FSDP leaves whole (an adapter's
trainables, FRoD's), the local shard for a sharded one. So:

- snapshot / restore (the best checkpoint's values, kept in memory): local copies, 1/N of the model per process,
  no communication.
- checkpoints: rank 0 writes the whole values as before (checkpoint.py); every process writes its shards of the
  sharded ones, and of their optimizer state, into `shards/rank-<r>-of-<N>.{trainable,best,optimizer}.safetensors`
  inside the same step directory before it is renamed into place (one atomic checkpoint). Resuming reads the
  process's own file: a run resumes with the number of processes it was written by (checked already), and no
  process ever holds more than its shard. Gathering on rank 0 instead would put the whole model and twice its
  AdamW state in one host's memory at every checkpoint (1.1 TB at 70B); torch.distributed.checkpoint would
  re-shard across process counts but stores its metadata as a pickle, which frod never loads.
- adapter/ and merged/ need the whole weights: `gather_state` brings them to rank 0's CPU, one tensor at a time
  (each gather a collective), and the method saves them (`Method.save_gathered`): one copy of the model in rank 0's
  host memory while it writes, as merged/ of any sharded run needs.
- fingerprints (builders.state_fingerprint): a sharded tensor is hashed whole (`whole`: gathered), so every
  process reports the digest one unsharded process would, and the ranks still compare like with like.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

SHARDS = "shards"


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t`: its shard of a DTensor, else `t`."""
    return t.to_local() if is_sharded(t) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """`t` unsharded (a collective for a DTensor: every process must call it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


# ---- in memory --------------------------------------------------------------------------------------------
def snapshot(model: nn.Module, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Copies (on the CPU) of what this process holds of the named parameters."""
    params = dict(model.named_parameters())
    return {n: local(params[n]).detach().to("cpu", copy=True) for n in names}


def restore(model: nn.Module, values: Dict[str, torch.Tensor]) -> None:
    """The named parameters back to `values` (as `snapshot` took them on this process)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in values.items():
            target = local(params[n])
            if target.shape != t.shape:
                raise ValueError(f"{n}: a saved value of shape {tuple(t.shape)} for a parameter this process holds "
                                 f"as {tuple(target.shape)} (saved by another number of processes?)")
            target.copy_(t.to(target.device))


def gather_state(model: nn.Module, main: bool) -> Optional[Dict[str, torch.Tensor]]:
    """The model's state dict with every sharded entry gathered whole, on rank 0's CPU (None elsewhere); one
    entry at a time, every process taking part."""
    state = {}
    for name, t in model.state_dict().items():
        full = whole(t.detach())
        if main:
            state[name] = full.to("cpu", copy=True)
        del full
    return state if main else None


def trains_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards some trainable parameter of `model` (method=full under train.fsdp)."""
    return any(p.requires_grad and is_sharded(p) for p in model.parameters())


def save_adapter(method: Any, model: nn.Module, directory: str, main: bool,
                 write: Callable[[str, Callable[[str], None]], None]) -> None:
    """adapter/ (or any adapter directory) of the current values: the method's own saving on rank 0, or, where the
    trainables are sharded, from the state gathered onto rank 0 (every process must call it then). write(directory,
    fill) writes atomically (frod_cli.runs.atomic_dir)."""
    if trains_sharded(model):
        state = gather_state(model, main)
        if main:
            write(directory, lambda d: method.save_gathered(state, d))
    elif main:
        write(directory, lambda d: method.save_adapter(model, d))


# ---- checkpoints ------------------------------------------------------------------------------------------
def split_values(values: Optional[Dict[str, torch.Tensor]], model: nn.Module) -> Tuple[Dict, Dict]:
    """(values FSDP leaves whole, this process's shards of the sharded ones), by parameter name."""
    if values is None:
        return {}, {}
    params = dict(model.named_parameters())
    shards = {n: t for n, t in values.items() if is_sharded(params[n])}
    return {n: t for n, t in values.items() if n not in shards}, shards


def split_optimizer(sd: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """An optimizer state dict without its sharded state tensors, and those as local shards keyed
    state.<param index>.<key> (checkpoint.py's flat names)."""
    state, shards = {}, {}
    for idx, entry in sd["state"].items():
        state[idx] = {}
        for key, v in entry.items():
            if is_sharded(v):
                shards[f"state.{idx}.{key}"] = local(v).detach().to("cpu").contiguous()
            else:
                state[idx][key] = v
    return {"state": state, "param_groups": sd["param_groups"]}, shards


def rank_file(directory: str, rank: int, world: int, what: str) -> str:
    return os.path.join(directory, SHARDS, f"rank-{rank:05d}-of-{world:05d}.{what}.safetensors")


def stage_shards(run_dir: str, step: int, rank: int, world: int, pieces: Dict[str, Dict[str, torch.Tensor]]) -> str:
    """This process's shards of one checkpoint ({what: tensors}), written into a staging directory that
    `move_staged` puts into the checkpoint being written (checkpoint.save_checkpoint's `extra`)."""
    from safetensors.torch import save_file

    staging = staging_dir(run_dir, step)
    os.makedirs(os.path.join(staging, SHARDS), exist_ok=True)
    for what, tensors in pieces.items():
        path = rank_file(staging, rank, world, what)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return staging


def staging_dir(run_dir: str, step: int) -> str:
    from frod_cli.runs.reader import CHECKPOINTS

    return os.path.join(run_dir, CHECKPOINTS, f".shards-step-{step:08d}")


def move_staged(staging: str, world: int) -> Callable[[str], None]:
    """The `extra` of checkpoint.save_checkpoint: every process's staged shard files into the checkpoint's
    temporary directory, with shards/layout.json (the number of processes) last."""
    def move(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, SHARDS), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(staging, SHARDS))):
            os.replace(os.path.join(staging, SHARDS, name), os.path.join(tmp, SHARDS, name))
        with open(os.path.join(tmp, SHARDS, "layout.json"), "w", encoding="utf-8") as f:
            json.dump({"processes": world}, f)
        shutil.rmtree(staging, ignore_errors=True)

    return move


def read_shards(ckpt_dir: str, rank: int, world: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """This process's shard files of a checkpoint ({} for a checkpoint without sharded trainables)."""
    from safetensors.torch import load_file

    if not os.path.isdir(os.path.join(ckpt_dir, SHARDS)):
        return {}
    with open(os.path.join(ckpt_dir, SHARDS, "layout.json"), encoding="utf-8") as f:
        written = int(json.load(f)["processes"])
    if written != world:
        raise ValueError(f"checkpoint {ckpt_dir} holds shards of {written} processes, this launch has {world}")
    out = {}
    for what in ("trainable", "best", "optimizer"):
        path = rank_file(ckpt_dir, rank, world, what)
        if os.path.exists(path):
            out[what] = load_file(path)
    return out


def join_optimizer(sd: Dict[str, Any], shards: Dict[str, torch.Tensor], params: List[torch.Tensor]) -> Dict[str, Any]:
    """The inverse of `split_optimizer`: each local shard back into a DTensor laid out as its parameter
    (params: the optimizer's parameters in state-dict index order)."""
    from torch.distributed.tensor import DTensor

    for name, t in shards.items():
        _, idx, key = name.split(".", 2)
        p = params[int(idx)]
        sd["state"].setdefault(int(idx), {})[key] = DTensor.from_local(
            t.to(local(p).device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return sd


def checkpoint_parts(model: nn.Module, trainable: Dict[str, torch.Tensor], best: Optional[Dict[str, torch.Tensor]],
                     optimizer_sd: Dict[str, Any], run_dir: str, step: int, acc: Any):
    """What rank 0's checkpoint.save_checkpoint writes (trainable, best, optimizer state dict) and its `extra`
    (None unless FSDP shards trainables: then every process has staged its shards, and extra moves them in).
    Every process calls it."""
    if not trains_sharded(model):
        return trainable, best, optimizer_sd, None
    trainable, trainable_shards = split_values(trainable, model)
    best_whole, best_shards = split_values(best, model)
    optimizer_sd, optimizer_shards = split_optimizer(optimizer_sd)
    pieces = {"trainable": trainable_shards, "optimizer": optimizer_shards}
    if best is not None:
        pieces["best"] = best_shards
    staging = stage_shards(run_dir, step, acc.process_index, acc.num_processes, pieces)
    acc.wait_for_everyone()
    return trainable, (best_whole if best is not None else None), optimizer_sd, \
        move_staged(staging, acc.num_processes)


def with_shards(saved: Dict[str, Any], model: nn.Module, optimizer: Any, acc: Any) -> Dict[str, Any]:
    """checkpoint.load_checkpoint's result with this process's shards added back (values by name, the optimizer
    state as DTensors); as it was for a checkpoint without shards."""
    try:
        shards = read_shards(saved["path"], acc.process_index, acc.num_processes)
    except (OSError, ValueError) as e:
        from frod_cli import FrodCliError, one_line

        raise FrodCliError(f"checkpoint {saved['path']}: its shards cannot be read ({one_line(e, 200)})") from None
    if not shards:
        return saved
    saved["trainable"].update(shards.get("trainable", {}))
    if saved["best"] is not None:
        saved["best"].update(shards.get("best", {}))
    params = [p for group in getattr(optimizer, "optimizer", optimizer).param_groups for p in group["params"]]
    saved["optimizer"] = join_optimizer(saved["optimizer"], shards.get("optimizer", {}), params)
    return saved
