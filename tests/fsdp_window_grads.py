"""For tests/test_fsdp.py::test_sharded_window_grads_equal_micro_batch_and_unsharded, run inside test_fsdp's one
2-process launch (tests/fsdp_runs.py calls `run_in_launch`; torchrun, gloo, CPU): FRoD's gradients after an
accumulation window over FSDP-sharded weights, next to the per-micro-batch path under FSDP and to one process's
window over every rank's data. Each rank writes, per variant, the lambda and S gradients after the data-parallel
average (grads-<variant>-<rank>.safetensors) and what else the test checks (rank-<rank>.json). Alone:

    torchrun --standalone --nproc_per_node 2 tests/fsdp_window_grads.py OUT_DIR

A tiny LLaMA whose MLP has 75 rows (the two ranks hold 38 and 37: uneven shards); FRoD in materialize order, so
every layer takes the window, with U recomputed from the shard's rows or stored (sliced). Each micro-batch's
backward runs inside set_requires_gradient_sync(False), as Accelerate's no_sync in frod train's loop."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from frod_cli.frod import FrodConfig, accumulate, apply_frod, frod_layers, window_buffer_bytes
from frod_cli.training.distributed import average_gradients

K = 3


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=75, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def adapted(store_u: bool):
    model = base_model()
    apply_frod(model, FrodConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], sparse_rate=0.1, seed=0, mode="materialize",
                                 store_u=store_u))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():  # perturbed values, so that dW != 0
        for _, layer in frod_layers(model):
            scale = 0.05 * layer.frod_sigma.mean()
            layer.frod_lambda.add_(torch.randn(layer.frod_lambda.shape, generator=g) * scale)
            layer.frod_s.copy_(torch.randn(layer.frod_s.shape, generator=g) * scale)
    return model.train()


def batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 64, (2, 7), generator=g) for _ in range(K)]


def loss_of(model, ids):
    logits = model(input_ids=ids).logits.float()
    readout = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    return (logits * readout).sum() / K


def sharded(model, mixed: bool = False, checkpointing: bool = False, keep: bool = False):
    """fully_shard per decoder layer and the root; keep: the layers' gathered weights kept from the forward to the
    backward (reshard_after_forward=False, train.fsdp.reshard_after_forward=false)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Accelerate's policy for train.mixed_precision=bf16: gathered and reduced in bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if mixed else None
    kw = {"mp_policy": mp} if mp is not None else {}
    # the trainables whole on every rank, as frod train's
    kw["ignored_params"] = {p for p in model.parameters() if p.requires_grad}
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=not keep, **kw)
    fully_shard(model, **kw)
    return model


def step(model, data, window: bool, mixed: bool = False):
    """K micro-batches (inside an accumulation window or not), then the average over the ranks, as the loop.
    Returns the window (None without) and the bytes it held before its exit."""
    context = accumulate(model, micro_batches=K) if window else torch.enable_grad()
    with context as w:
        for ids in data:
            model.set_requires_gradient_sync(False)  # Accelerate's no_sync
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                loss = loss_of(model, ids)
            loss.backward()
            model.set_requires_gradient_sync(True)
        held = w.memory_bytes()["total"] if w is not None else None
    average_gradients([p for p in model.parameters() if p.requires_grad], dist.get_world_size())
    return w, held


def one_process(model, every_rank, window: bool):
    """The unsharded reference: every rank's micro-batches in one process, divided by the ranks (their average)."""
    data = [ids for rank_data in every_rank for ids in rank_data]
    context = accumulate(model, micro_batches=len(data)) if window else torch.enable_grad()
    with context:
        for ids in data:
            (loss_of(model, ids) / len(every_rank)).backward()


def grads(model):
    return {f"{n}.{p}": getattr(layer, f"frod_{p}").grad.detach().clone() for n, layer in frod_layers(model)
            for p in ("lambda", "s")}


def full_weights(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if not p.requires_grad}


def run_in_launch(out: Path, rank: int, world: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    every_rank = [batches(r) for r in range(world)]
    info = {}
    for store_u in (False, True):
        tag = "stored" if store_u else "recomputed"
        ref = adapted(store_u)
        ref_window = copy.deepcopy(ref)
        one_process(ref, every_rank, window=False)
        one_process(ref_window, every_rank, window=True)
        save_file(grads(ref), str(out / f"grads-{tag}-one-{rank}.safetensors"))
        save_file(grads(ref_window), str(out / f"grads-{tag}-one_window-{rank}.safetensors"))
        # name: (window, bf16 mixed precision, gradient checkpointing, gathered weights kept for the backward)
        variants = {"fsdp": (False, False, False, False), "fsdp_window": (True, False, False, False),
                    "fsdp_window_checkpointing": (True, False, True, False),
                    "fsdp_window_kept": (True, False, False, True),
                    "fsdp_bf16": (False, True, False, False), "fsdp_window_bf16": (True, True, False, False)}
        for name, (window, mixed, checkpointing, keep) in variants.items():
            if store_u and name not in ("fsdp", "fsdp_window"):
                continue
            model = sharded(adapted(store_u), mixed, checkpointing, keep)
            before, planned = full_weights(model), window_buffer_bytes(model)
            w, held = step(model, every_rank[rank], window, mixed)
            after = full_weights(model)
            save_file(grads(model), str(out / f"grads-{tag}-{name}-{rank}.safetensors"))
            info[f"{tag}-{name}"] = {
                "windowed": len(w.layers) if w is not None else None,
                "layers": sum(1 for _ in frod_layers(model)),
                "weights_restored": all(torch.equal(before[k], after[k]) for k in before),
                "weights_frozen": not any(p.requires_grad for n, p in model.named_parameters() if n in before),
                "held": held, "planned": planned, "unsharded": window_buffer_bytes(ref),
                "held_after": w.memory_bytes()["total"] if w is not None else None,
            }
            del model
    (out / f"rank-{rank}.json").write_text(json.dumps(info))


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run_in_launch(Path(sys.argv[1]), rank, world)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
