"""One copy of the weights per node under `train.fsdp.load_on_rank0` (on by default for sharded runs).

The first process of each node reads the base; the others build its structure on the meta device
(models.load_model(empty=True): no weight read, allocated or initialized, a `tiny:` model included: its seeded
weights are rank 0's like any checkpoint's). The method adapts every copy alike: the LoRA family and full fine-tuning
need no weights for that (their adapters are created on meta where the base is); FRoD builds its bases on the ranks
that hold weights and broadcasts them (frod/adapter.py); methods that initialize from the weights themselves
(`Method.needs_base_weights`: PiSSA, PEFT's FRoD) make every process load instead (distributed.load_options).
Then, inside `FsdpAccelerator.prepare`:

1. `fill_from_rank0`, before sharding: every tensor FSDP does not shard (buffers such as the rotary frequencies,
   the trainables it leaves whole: adapters, heads) that is on the meta device on some process gets rank 0's
   values, one broadcast per tensor, swapped into the same Parameter object (the optimizer built before keeps
   it); the RNG state follows rank 0's, since an initialization on the meta device drew nothing.
2. FSDP shards the model: on meta, a meta DTensor shard is all a process allocates (`fully_shard` leaves meta
   tensors where they are); rank 0 keeps references to its whole weights meanwhile (`weights_to_shard`).
3. `load_shards_from_rank0`, after sharding: the meta shards are allocated on their device and every sharded
   parameter is scattered from rank 0 (torch's `distribute_tensor(src_data_rank=0)`), one parameter at a time,
   rank 0 dropping each whole weight once sent. The Parameter objects stay the same (nn.Module._apply swaps
   DTensor contents in place; FSDP re-registers its padded shards), so the optimizer needs no rebinding for it.

This replaces Accelerate's `cpu_ram_efficient_loading`, which moves the whole model to meta (FRoD's own tensors and
the whole trainables with it) and loads a state dict whose every entry it expects to be a sharded DTensor.
Memory: a non-loading process holds no weight until its shard arrives (its shard, then, and the tensors of step 1);
rank 0 holds the whole model until the scatter, plus its own shard from `fully_shard` (1 + 1/N of the weights at
the peak), and its shard after.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

log = logging.getLogger("frod.distributed")


def loads_weights() -> bool:
    """Whether this process reads the base's weights under train.fsdp.load_on_rank0: the first of its node."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0
    except ValueError:
        return True


def comm_device() -> torch.device:
    """Where a tensor must be for the process group's backend: gloo takes CPU tensors, nccl CUDA ones."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unsharded_entries(model: nn.Module, shard_trainables: bool) -> Iterator[Tuple[dict, str, torch.Tensor]]:
    """(store, key, tensor) of every tensor FSDP leaves whole, in module order (the same on every rank), each once:
    the buffers, and the trainable parameters unless FSDP shards them too."""
    seen = set()
    for module in model.modules():
        stores = [module._buffers] + ([] if shard_trainables else [module._parameters])
        for store in stores:
            for key, t in store.items():
                if t is None or id(t) in seen or (store is module._parameters and not t.requires_grad):
                    continue
                seen.add(id(t))
                yield store, key, t


def fill_from_rank0(model: nn.Module, shard_trainables: bool) -> bool:
    """Step 1 of the module docstring. Returns whether some process of the launch started from the meta device
    (every process gets the same answer)."""
    import torch.distributed as dist

    entries = list(unsharded_entries(model, shard_trainables))
    comm = comm_device()
    flags = torch.tensor([int(t.is_meta) for _, _, t in entries] +
                         [int(any(p.is_meta for p in model.parameters()))], dtype=torch.uint8, device=comm)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if not int(flags[-1]):
        return False
    rank = dist.get_rank()
    for (store, key, t), flag in zip(entries, flags[:-1].tolist()):
        if flag:
            value = t.detach().to(comm) if rank == 0 else torch.empty(t.shape, dtype=t.dtype, device=comm)
            dist.broadcast(value, src=0)
            put(store, key, t, value.to("cpu"))  # where rank 0's copy is before prepare: models load on the CPU
    follow_rng_of_rank0(comm)
    return True


def put(store: dict, key: str, old: torch.Tensor, value: torch.Tensor) -> None:
    """`value` in place of `old` under store[key]; a Parameter keeps its identity (its contents are swapped)."""
    if isinstance(old, nn.Parameter):
        torch.utils.swap_tensors(old, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        store[key] = value


def follow_rng_of_rank0(comm: torch.device) -> None:
    """Every process's CPU RNG state becomes rank 0's: a fully loaded launch draws the same numbers on every
    process during setup, a process that initialized on the meta device drew none."""
    import torch.distributed as dist

    state = torch.get_rng_state().to(comm)
    dist.broadcast(state, src=0)
    torch.set_rng_state(state.cpu())


def weights_to_shard(model: nn.Module, replicated: List[nn.Parameter]) -> Dict[str, torch.Tensor]:
    """Rank 0's whole weights that FSDP is about to shard, by name (references, no copy), for the scatter after."""
    whole = {id(p) for p in replicated}
    return {name: p.detach() for name, p in model.named_parameters() if id(p) not in whole}


def load_shards_from_rank0(model: nn.Module, held: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Step 3 of the module docstring (every process calls it; `held` is empty but on rank 0). device: where the
    shards live (the accelerator, or the CPU under train.fsdp.cpu_offload)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    materialize(model, device)
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        mesh = p.device_mesh
        whole = held.pop(name, None)
        source = whole.to(mesh.device_type) if whole is not None else \
            torch.empty(p.shape, dtype=p.dtype, device=mesh.device_type)  # not read: its shape tells the split
        piece = distribute_tensor(source, mesh, p.placements, src_data_rank=0)
        with torch.no_grad():
            local = p.to_local()
            local.copy_(piece.to_local().to(local.device))
        del source, piece, whole


def materialize(model: nn.Module, device: torch.device) -> None:
    """The meta-device shards allocated (uninitialized) on `device` (the CPU where FSDP offloads them); the other
    tensors untouched (`to_empty` would overwrite them)."""
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
