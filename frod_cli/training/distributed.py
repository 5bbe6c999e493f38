"""Sharded training: `train.fsdp.enabled=true` on a multi-process launch (FSDP2, torch's `fully_shard`,
through Accelerate's `FullyShardedDataParallelPlugin`). docs/SCALING.md has the commands and the memory
arithmetic; this docstring is the design.

Who shards. Accelerate does, on every device: `acc.prepare` runs its `fsdp2_prepare_model`, which
applies `fully_shard` to each module of the `wrap` classes (default: the model's `_no_split_modules`,
i.e. its decoder/encoder layer), to the input embeddings and the output tail, then to the root. On a GPU
launch Accelerate enters `DistributedType.FSDP` by itself when it is given the plugin. On a CPU launch
(torchrun over gloo, as in CI) it stays `MULTI_CPU` and ignores the plugin (accelerate/state.py only
switches the GPU-like types), yet the FSDP2 path itself runs on CPU unchanged (DTensor weights, gloo
all-gather and reduce-scatter, forward and backward): `FsdpAccelerator` switches the state to FSDP for
such a launch, so CPU and GPU runs take the same code. The alternative (our own `fully_shard` in
`FinetuneRecipe.wrap_model`) would have needed Accelerate kept away from the model, which it would
otherwise wrap in DDP on MULTI_CPU.

What is sharded: the frozen weights, which are where the memory of a large model is. (method=full shards every
weight with its gradient and AdamW state instead, ZeRO-3: `set_model_policy(shard_trainables=True)`, and the loop
keeps its values as each rank's shards: training/sharded.py.) The trainables of a method that freezes its base (FRoD's lambda and S values, LoRA's factors, the task head) are given to
`fully_shard` as `ignored_params`: they stay whole, plain tensors, identical on every rank, exactly as
under DDP, so snapshots, checkpoints (FULL and SHARDED state dicts are then the same files: nothing
sharded is trainable), the optimizer state (float32, whole), adapter/ and the rank fingerprint check are
the DDP code. FSDP does not reduce the gradients of ignored parameters: `FsdpAccelerator.backward`
averages them over the ranks with DDP's rule (after a backward outside `no_sync`, i.e. once per window
of the loop's gradient accumulation), in one flat all-reduce per dtype. FRoD's shared tensors (basis V,
V^-T, pattern rows/cols: the `frod_adapter` FrodState module; sigma, stored U) are buffers, which FSDP
never shards. They are built once for the launch, before sharding, under DDP and FSDP alike: `apply_frod`
deals the categories to the ranks, each rank decomposes its share on its accelerator (`Method.device`, set by
the recipe) or reads it from the basis cache, and broadcasts it (frod/build.py), so every rank holds the same
bytes (`FinetuneRecipe._check_identical_ranks` verifies it, once the weights are in place). FSDP moves what it
shards, and the buffers, to the device; the ignored trainables are moved by `prepare_sharded`.

Loading (train.fsdp.load_on_rank0, the default): one process per node reads the base, the others start from the
meta device and receive their shards from rank 0 (`load_options`, training/rank0.py, which says why Accelerate's
`cpu_ram_efficient_loading` does not fit the whole trainables). A 4-bit base loads on every process, packed in the
dtype FSDP gathers it in (FSDP-QLoRA's route, `load_options`); its quantization states, which are not parameters,
are put on the device after sharding (`place_quant_states`) and read from the module where FSDP's gathered weight
lacks them (frod/layer.py `quant_state_of`, as bitsandbytes' own forward does).

FRoD reads its layer's full weight W (U recomputed as W V^-T diag(1/sigma)): inside a forward that is
what FSDP provides (the enclosing unit's pre-forward hook all-gathers the unit's weights; the pooler or
head outside any layer belongs to the root unit, gathered for the whole forward). Outside a forward the
weights are shards, so:
  - merged/: rank 0 rebuilds the model on CPU (the base as loaded at the start, plus the adapter of the
    current values; no basis is recomputed) and merges that; the merge check compares it with the
    sharded model's own outputs (`FinetuneRecipe._write_merged_sharded`).
  - accumulation windows (method.accumulate=window, frod/accumulate.py) build W + dW outside the
    forward's gather and keep it for every adapted layer for the whole window: an unsharded copy of all
    adapted weights. Refused under FSDP; `auto` takes the per-micro-batch path (logged).
  - FrodLinear's evaluation cache keeps one m x n dW per layer across calls (an unsharded copy again):
    dropped after each forward of a sharded model (`Method.before_sharding`: FRoD's hook).
Also: after a forward without gradients every unit is resharded, so that code run on rank 0 alone (PEFT's
save_pretrained reads the state dict) cannot leave the ranks in different gather states
(`reshard_after_no_grad_forward`); generation steps every rank until all finish (`after_sharding`); and
train.mixed_precision autocasts the forward as Accelerate's DDP path does (`autocast_forward`). PEFT's generate()
bypasses the root's forward, so the root's own weights are gathered on the wrapped model's forward too.
train.fsdp.cpu_offload on a one-GPU launch runs FSDP over that one process (`offloads_one_gpu`): nothing is split,
the weights live in host memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch import nn

from frod_cli import FrodCliError

log = logging.getLogger("frod.distributed")

STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


def world_size_of_launch() -> int:
    """The number of processes of this launch (torchrun / accelerate launch set WORLD_SIZE), before
    Accelerate starts."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_fsdp_config(cfg: Any) -> bool:
    """Refuse what train.fsdp cannot do before any work; True when this launch shards."""
    fc = cfg.train.fsdp
    if not bool(fc.enabled):
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            # Accelerate would build its own plugin from the launch's fsdp_* settings and shard the
            # trainables too, which the loop's adapter saving and checkpoints do not gather
            raise FrodCliError("this launch asks Accelerate for FSDP (an accelerate config with distributed_type: "
                               "FSDP): frod train shards through train.fsdp; add train.fsdp.enabled=true (its "
                               "settings replace the config's fsdp_* keys) or launch with distributed_type: MULTI_GPU")
        return False
    if int(fc.version) != 2:
        raise FrodCliError(f"train.fsdp.version={fc.version}: only FSDP2 (torch's fully_shard) is supported; use 2")
    if str(fc.state_dict_type).upper() not in STATE_DICT_TYPES:
        raise FrodCliError(f"train.fsdp.state_dict_type must be one of {', '.join(STATE_DICT_TYPES)}, "
                           f"got {fc.state_dict_type!r}")
    if fc.wrap is not None and (isinstance(fc.wrap, str) or not all(isinstance(w, str) and w for w in fc.wrap)):
        raise FrodCliError(f"train.fsdp.wrap must be a list of module class names, got {fc.wrap!r}")
    if world_size_of_launch() < 2 and not offloads_one_gpu(cfg):
        log.info("train.fsdp.enabled with one process: nothing to shard; training unsharded")
        return False
    accumulate = cfg.method.get("accumulate") if hasattr(cfg.method, "get") else None
    if accumulate == "window":
        raise FrodCliError("method.accumulate=window needs every adapted layer's full W + dW outside the forward "
                           "for the whole window, which sharding forbids: use method.accumulate=micro_batch (or "
                           "auto) with train.fsdp")
    if accumulate == "auto":
        cfg.method.accumulate = "micro_batch"
        log.info("train.fsdp: method.accumulate=auto takes micro_batch (a window would hold an unsharded "
                 "W + dW per adapted layer)")
    return True


def load_options(cfg: Any, mixed: str) -> dict:
    """models.load_model's options for this process of a sharded launch.

    A 4-bit base: its packed bytes stored in the dtype FSDP gathers the unit in (train.mixed_precision's, else
    the compute dtype), the route of FSDP-QLoRA: bitsandbytes' default uint8 storage is not a float tensor and FSDP
    would leave it whole; loaded on the CPU, from where FSDP moves each rank's shard to its device. Every process
    quantizes its own copy (bitsandbytes quantizes as the weights load; a meta-device copy has no quantization
    state to receive the shards into).
    Otherwise, with train.fsdp.load_on_rank0, every process but the first of its node builds the structure alone
    on the meta device and receives rank 0's weights (training/rank0.py), unless the method initializes from the
    base weights (`Method.needs_base_weights`)."""
    from frod_cli.methods import get_method
    from frod_cli.training.rank0 import loads_weights

    if str(cfg.model.get("quantization", "none") or "none") != "none":
        from frod_cli.models import loaded_dtype

        storage = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed) or loaded_dtype(cfg.model)
        if bool(cfg.train.fsdp.load_on_rank0):
            first_log(f"a 4-bit base loads and quantizes on every process (packed in "
                      f"{str(storage).replace('torch.', '')}); train.fsdp.load_on_rank0 applies to unquantized bases")
        return {"quant_storage": storage, "quant_device": "cpu"}
    if not bool(cfg.train.fsdp.load_on_rank0):
        return {}
    needs = get_method(cfg.method.name).needs_base_weights
    if needs:
        first_log(f"method={cfg.method.name}: {needs}, so every process loads the base "
                  "(train.fsdp.load_on_rank0 does not apply)")
        return {}
    return {} if loads_weights() else {"empty": True}


def first_log(message: str) -> None:
    """A log line from the launch's first process only."""
    if os.environ.get("RANK", "0") == "0":
        log.info("train.fsdp: %s", message)


def offloads_one_gpu(cfg: Any) -> bool:
    """train.fsdp.cpu_offload on a one-GPU launch (torchrun --nproc_per_node 1): FSDP over one process, which
    shards nothing but keeps the weights (and method=full's gradients and optimizer step) in host memory,
    gathering each unit onto the GPU for its forward and backward: a model larger than the GPU trains on it."""
    fc = cfg.train.fsdp
    return bool(fc.cpu_offload) and not bool(cfg.train.cpu) and torch.cuda.is_available() and \
        os.environ.get("LOCAL_RANK") is not None


def make_plugin(fc: Any, on_cpu: bool = False):
    """Accelerate's FSDP2 plugin for train.fsdp (the wrap policy and ignored parameters are set once the
    model exists: `FsdpAccelerator.set_model_policy`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    offload = bool(fc.cpu_offload)
    if offload and on_cpu:
        log.info("train.fsdp.cpu_offload on a CPU launch: the shards are in CPU memory already")
        offload = False
    elif offload:
        first_log("cpu_offload: the shards (with their gradients, and method=full's optimizer step) stay in host "
                  "memory; each unit is gathered onto the GPU for its forward and backward")
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=bool(fc.reshard_after_forward),
        cpu_offload=offload,
        state_dict_type=str(fc.state_dict_type).upper(),
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(fc.wrap) if fc.wrap is not None else None,
    )


def _accelerator_class():
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    class FsdpAccelerator(Accelerator):
        """Accelerate with its FSDP2 path on CPU launches too, and DDP's gradient rule for the parameters
        FSDP leaves whole (the trainables): averaged over the ranks after each backward that runs
        outside `no_sync`."""

        def __init__(self, *args: Any, fsdp_plugin: Any, **kwargs: Any):
            from torch.distributed.fsdp import CPUOffloadPolicy

            if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy) and torch.cuda.is_available():
                # offloaded shards take part in CPU-side collectives: Accelerate then starts nccl + gloo
                os.environ.setdefault("FSDP_OFFLOAD_PARAMS", "true")
            super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
            if self.state.distributed_type == DistributedType.MULTI_CPU:
                # accelerate/state.py enters FSDP for GPU-like launches only; its FSDP2 path (prepare,
                # no_sync, DTensor-aware clipping, state dicts) runs on CPU over gloo as it is.
                self.state.distributed_type = DistributedType.FSDP
                if self.state.mixed_precision != "no":  # as accelerate/state.py does for FSDP launches
                    fsdp_plugin.set_mixed_precision(self.state.mixed_precision)
                self.state.fsdp_plugin = fsdp_plugin
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if not self.is_fsdp2:
                raise FrodCliError(f"train.fsdp: Accelerate did not enter FSDP on this launch "
                                   f"({self.state.distributed_type}); launch with torchrun or accelerate launch")
            self.replicated: List[nn.Parameter] = []
            self.shard_trainables = self.meta_loaded = False
            self._no_sync_depth = 0

        def set_model_policy(self, model: nn.Module, wrap: Optional[Sequence[str]],
                             shard_trainables: bool = False) -> None:
            """Before `prepare`: the classes to wrap and the trainables, which FSDP leaves whole unless they are
            every weight (method=full: sharded with their gradients and AdamW state, ZeRO-3)."""
            self.replicated = set_model_policy(self.state.fsdp_plugin, model, wrap, self.num_processes,
                                               self.is_main_process, shard_trainables)
            self.shard_trainables = shard_trainables

        def prepare(self, *args: Any, **kwargs: Any) -> Any:
            return prepare_sharded(self, super().prepare, args, kwargs)

        @contextlib.contextmanager
        def no_sync(self, model: nn.Module) -> Iterator[None]:
            self._no_sync_depth += 1
            try:
                with super().no_sync(model):
                    yield
            finally:
                self._no_sync_depth -= 1

        def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
            super().backward(loss, **kwargs)
            if self._no_sync_depth == 0 and self.replicated:
                average_gradients(self.replicated, self.num_processes)

    return FsdpAccelerator


def prepare_sharded(acc: Any, prepare: Any, args: tuple, kwargs: dict) -> Any:
    """FsdpAccelerator.prepare: Accelerate's prepare (sharding), around it the rank-0 route of training/rank0.py,
    and the optimizer's parameters bound again by name (Accelerate matches them by storage address, which all meta
    tensors share)."""
    from frod_cli.training import rank0

    model = next((a for a in args if isinstance(a, nn.Module)), None)
    optimizer = next((a for a in args if isinstance(a, torch.optim.Optimizer)), None)
    held, names = {}, None
    if model is not None:
        acc.meta_loaded = rank0.fill_from_rank0(model, acc.shard_trainables)
        if acc.meta_loaded and acc.is_main_process:
            held = rank0.weights_to_shard(model, acc.replicated)
        names = parameter_names(optimizer, model) if optimizer is not None else None
        with torch.no_grad():  # FSDP moves what it shards, and buffers, to the device; the whole ones are ours to move
            for p in acc.replicated:
                if p.device != acc.device:
                    p.data = p.data.to(acc.device)  # the same Parameter: the optimizer holds it
    result = prepare(*args, **kwargs)
    objects = result if isinstance(result, (tuple, list)) else (result,)
    prepared = next((o for o in objects if isinstance(o, nn.Module)), None)
    if prepared is not None:
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer) and names is not None:
                rebind_optimizer(obj, names, acc.unwrap_model(prepared))
        if acc.meta_loaded:
            rank0.load_shards_from_rank0(prepared, held, shard_device(acc))
        after_sharding(prepared, acc)
    return result


def shard_device(acc: Any) -> torch.device:
    """Where this process's shards live: its device, or the CPU under train.fsdp.cpu_offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    offload = isinstance(acc.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
    return torch.device("cpu") if offload else acc.device


def parameter_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> List[List[str]]:
    """The model's name of every parameter of every group of `optimizer`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def rebind_optimizer(optimizer: Any, names: List[List[str]], model: nn.Module) -> None:
    """Each group of `optimizer` (Accelerate's wrapper or a plain one) holds the model's parameters of those names
    (the sharded ones after prepare)."""
    params = dict(model.named_parameters())
    inner = getattr(optimizer, "optimizer", optimizer)
    for group, group_names in zip(inner.param_groups, names):
        group["params"] = [params[n] for n in group_names]


def set_model_policy(plugin: Any, model: nn.Module, wrap: Optional[Sequence[str]], world: int,
                     main: bool, shard_trainables: bool = False) -> List[nn.Parameter]:
    """Give the plugin the classes to wrap (checked against the model) and the trainables as ignored
    parameters; returns the trainables (whole on every rank, kept in sync by FsdpAccelerator). shard_trainables:
    none is ignored, FSDP shards them with the frozen ones (and reduce-scatters their gradients)."""
    names = list(wrap) if wrap is not None else list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        layers = sorted(n for n in present if n.endswith(("Layer", "Block", "Embeddings")))
        raise FrodCliError(f"train.fsdp.wrap: no module of class {', '.join(missing)} in this model; "
                           f"candidates: {', '.join(layers) or 'none'}")
    # Accelerate makes the input embeddings (and the output head) units of their own after the wrap
    # classes: a wrapped class holding them (BERT's _no_split_modules lists BertEmbeddings) would shard
    # them twice, which fully_shard rejects.
    holders = embedding_holders(model)
    if wrap is not None and holders & set(names):
        raise FrodCliError(f"train.fsdp.wrap: {', '.join(sorted(holders & set(names)))} holds the input "
                           "embeddings or the output head, which Accelerate shards as units of their own; "
                           "list the layer classes only")
    names = [n for n in names if n not in holders]
    if not names:
        log.warning("train.fsdp: the model names no layer class (_no_split_modules) and train.fsdp.wrap "
                    "is not set: the whole model is one FSDP unit, gathered for every forward")
    plugin.transformer_cls_names_to_wrap = names
    mp = plugin.mixed_precision_policy
    if mp is not None and getattr(mp, "output_dtype", None) is not None:
        # the root's outputs as the autocast forward returns them (float32, as under DDP), not recast to
        # bf16/fp16 after it (autocast_forward)
        plugin.mixed_precision_policy = dataclasses.replace(mp, output_dtype=None)
    replicated = [] if shard_trainables else [p for p in model.parameters() if p.requires_grad]
    # Accelerate reads `ignored_modules` as modules and ignores their parameters: a ParameterList that
    # is not attached to the model names exactly the trainables (a FrodLinear also holds its frozen W).
    plugin.ignored_modules = [nn.ParameterList(replicated)] if replicated else None
    if main:
        sharded = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in replicated)
        log.info("train.fsdp: sharding %s %sparameters over %d processes (units: %s); %s trainable "
                 "parameters whole on every rank", f"{sharded:,}", "" if shard_trainables else "frozen ", world,
                 ", ".join(names) or "the root", f"{sum(p.numel() for p in replicated):,}")
    return replicated


def after_sharding(model: nn.Module, acc: Any) -> None:
    """What the sharded model needs beyond Accelerate's prepare (see the functions called)."""
    # transformers' marker of an FSDP2 model: generate() then keeps every rank stepping until all have
    # finished (synced_gpus), as each step gathers weights from all ranks
    model._is_fsdp_managed_module = True
    place_quant_states(model, acc.device)
    reshard_after_no_grad_forward(model)
    if acc.native_amp:
        autocast_forward(model, acc)
    if acc.is_main_process:
        local, full = shard_sizes(model)
        log.info("train.fsdp: %s of %s sharded elements on this rank (%.1f%%)", f"{local:,}", f"{full:,}",
                 100.0 * local / max(full, 1))


def place_quant_states(model: nn.Module, device: torch.device) -> None:
    """A 4-bit base's quantization states (per-block scales, codebook) on the device its layers compute on: they
    are not parameters, so FSDP moved only the packed bytes of each shard (the base loads on the CPU)."""
    from frod_cli.frod.layer import quant_state_of

    for module in model.modules():
        state = quant_state_of(module)
        if state is not None and state.absmax.device != device:
            state.to(device)


def shard_sizes(model: nn.Module) -> tuple:
    """(elements of this rank's shards, elements of the sharded parameters in full) over the DTensor parameters."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            local += p.to_local().numel()
            full += p.numel()
    return local, full


def embedding_holders(model: nn.Module) -> set:
    """Class names of the modules that contain the input embeddings or the output embeddings (the root
    aside)."""
    targets = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    targets = [t for t in targets if isinstance(t, nn.Module)]
    names = set()
    for _, m in model.named_modules():
        if m is model:
            continue
        if any(t is m or any(t is s for s in m.modules()) for t in targets):
            names.add(type(m).__name__)
    return names


def make_accelerator(fc: Any, **kwargs: Any):
    """An Accelerator in FSDP2 mode for train.fsdp (see the module docstring)."""
    on_cpu = bool(kwargs.get("cpu")) or not torch.cuda.is_available()
    return _accelerator_class()(fsdp_plugin=make_plugin(fc, on_cpu), **kwargs)


def average_gradients(params: Sequence[torch.Tensor], world: int) -> None:
    """Mean of the parameters' gradients over the ranks, one flat all-reduce per dtype. Every rank must
    hold gradients for the same parameters (checked: a mismatch would corrupt the average silently)."""
    import torch.distributed as dist

    with_grad = [p for p in params if p.grad is not None]
    counts = torch.tensor([len(with_grad), -len(with_grad)], dtype=torch.long, device=params[0].device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if int(counts[0]) != -int(counts[1]):
        raise RuntimeError(f"train.fsdp: ranks hold gradients for different numbers of trainable parameters "
                           f"({-int(counts[1])} to {int(counts[0])}); every trainable must be used in every step")
    by_dtype: dict = {}
    for p in with_grad:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def autocast_forward(model: nn.Module, acc: Any) -> None:
    """train.mixed_precision under FSDP: Accelerate gives FSDP a MixedPrecisionPolicy (the sharded weights
    gathered in bf16/fp16) but, unlike its DDP path, no autocast, so the float32 trainables that FSDP
    leaves whole (a task head) would meet bf16 activations. The model's forward autocasts as under DDP
    (outputs back in float32), so both paths compute alike."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    context = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)
    forward = model.forward.__func__ if hasattr(model.forward, "__func__") else model.forward
    model._original_forward = model.forward
    wrapped = convert_outputs_to_fp32(context(forward))
    model.forward = MethodType(wrapped, model) if hasattr(model._original_forward, "__func__") else wrapped


def reshard_after_no_grad_forward(model: nn.Module) -> None:
    """Every unit back to its shards after a forward without gradients (evaluation, generation, the merge
    check). FSDP keeps the root unit (and Accelerate's output-head unit) gathered after its forward for the
    backward that follows; after an evaluation none follows, and the first `state_dict()` call on one rank
    alone (PEFT's save_pretrained on the main process) would reshard them there only: the next forward's
    all-gathers would then differ between ranks and hang or abort gloo."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def reshard(module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            for unit in units:
                unit.reshard()

    model.register_forward_hook(reshard)
    inner = getattr(model, "get_base_model", lambda: model)()
    if inner is not model and isinstance(model, FSDPModule):
        # PEFT's generate() calls the wrapped transformers model, not the root's forward, so the root's own
        # weights (the final norm, unless Accelerate made it a unit of its own) would stay sharded there
        inner.register_forward_pre_hook(lambda module, args: model.unshard())
        inner.register_forward_hook(reshard)


def rank_fingerprints(acc: Any, model: nn.Module) -> List[str]:
    """state_fingerprint (buffers and trainables) of every rank."""
    from accelerate.utils import gather_object

    from frod_cli.training.builders import state_fingerprint

    return list(gather_object([state_fingerprint(model)]))


def shutdown(acc: Any) -> None:
    """The end of a run, on every rank together: a barrier (a rank tearing gloo down while another still
    talks to it aborts the process), Accelerate ends the trackers and destroys the process group, then
    drops its references to the prepared objects and collects them. A sharded model's parameters keep
    the process group alive through their device mesh even after it is destroyed: released here, it goes
    while the interpreter is fully alive, not during interpreter exit, where tearing down gloo's work can
    abort the process (pytorch/pytorch PR 179291). Callers drop their own references to the model first."""
    import gc

    acc.wait_for_everyone()
    acc.end_training()
    acc.free_memory()
    gc.collect()  # free_memory collects before it clears its lists: the model goes in this collection
