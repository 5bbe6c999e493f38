"""--fsdp: what sharded training (train.fsdp) holds per process, two CPU processes over gloo (torchrun, one thread
each) against one, through the code `frod train` runs (distributed.make_accelerator, FsdpAccelerator.prepare).

- loading (--fsdp-parts load): a LLaMA-7B-shaped LlamaForCausalLM of --fsdp-blocks blocks in bfloat16 (hidden 4096,
  MLP 11008, vocabulary 32000) with FRoD on q,k,v,o,gate,up (its basis shape-only, read from a basis cache rank 0
  writes: adapters.adapt_shape_only's reason), loaded as train.fsdp.load_on_rank0 does (rank 1 on the meta
  device) and, for the comparison, on both ranks. Per rank, the resident set grown since before loading: after
  loading, after the adapter, after sharding (rank 0's weights scattered), and the peak.
- bytes (--fsdp-parts bytes): per rank after sharding against one process (the same model before sharding, in
  the same process): the parameter bytes of an NF4 base adapted by FRoD, and the trainable plus AdamW bytes of
  method=full after one optimizer step (--fsdp-bytes-shape: a small LLaMA; what is compared is a ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import torch

from frod_cli.bench.common import PeakRSS, environment, fmt_bytes, malloc_trim, ratio, refuse, rss_bytes, write_result

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
SHAPES = {"llama7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=32000),
          "small": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                        vocab_size=1024),
          "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=2, num_key_value_heads=2,
                       vocab_size=256)}
PARTS = ("load", "bytes")


def causal_lm(shape: str, blocks: int, dtype: torch.dtype, seed: int, empty: bool) -> torch.nn.Module:
    """A seeded random LlamaForCausalLM of `shape`, built in `dtype` (or its structure alone on meta)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=blocks, tie_word_embeddings=False, max_position_embeddings=512,
                         **SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy on the way
    try:
        with torch.device("meta") if empty else torch.device("cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def fsdp_accelerator(load_on_rank0: bool):
    from frod_cli.training import distributed as D

    fc = SimpleNamespace(enabled=True, wrap=None, reshard_after_forward=True, cpu_offload=False,
                         state_dict_type="FULL_STATE_DICT", version=2, load_on_rank0=load_on_rank0)
    return D.make_accelerator(fc, cpu=True)


def frod_shape_only(model: torch.nn.Module, args, cache_dir: str, acc) -> torch.nn.Module:
    """FRoD through the registry on every rank, its bases read from `cache_dir`, which the ranks holding weights
    fill with the shape-only basis first (adapters.adapt_shape_only, spread over processes)."""
    from unittest import mock

    from frod_cli.bench.adapters import build, write_shape_only_basis

    with mock.patch.dict("os.environ", {"FROD_CACHE_DIR": cache_dir}):
        method = build("frod", args, PAPER_TARGETS, basis_cache=True)
        if not next(model.parameters()).is_meta:
            write_shape_only_basis(method.frod_config(model), model, cache_dir)
        acc.wait_for_everyone()
        return method.adapt(model)


def local_bytes(tensors) -> int:
    """Bytes of what this process holds of `tensors` (a DTensor's local shard), each tensor once."""
    from frod_cli.training.sharded import local

    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            part = local(t)
            total += part.numel() * part.element_size()
    return total


def load_worker(args) -> int:
    """One rank of the loading measurement: rank-<r>.json in --out's directory."""
    from frod_cli.training.rank0 import loads_weights

    import transformers.models.llama.modeling_llama  # noqa: F401  (the code's own memory is not the model's)

    import frod_cli.bench.adapters  # noqa: F401
    import frod_cli.methods.frod  # noqa: F401

    torch.set_num_threads(1)
    acc = fsdp_accelerator(args.fsdp_meta)
    malloc_trim()
    start = rss_bytes()
    model = causal_lm(args.fsdp_shape, args.fsdp_blocks, torch.bfloat16, args.seed,
                      empty=args.fsdp_meta and not loads_weights())
    malloc_trim()
    loaded = rss_bytes()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = frod_shape_only(model, args, str(Path(args.out).parent / "cache"), acc)
    malloc_trim()
    adapted = rss_bytes()
    bases = sum(b.numel() * b.element_size() for b in model.buffers())
    acc.set_model_policy(model, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with PeakRSS() as mem:
        model, optimizer = acc.prepare(model, optimizer)
    malloc_trim()
    row = {"rank": acc.process_index, "meta": bool(args.fsdp_meta and not loads_weights()),
           "model_bytes": model_bytes, "bases_bytes": bases, "after_load": loaded - start,
           "after_adapter": adapted - start, "after_sharding": rss_bytes() - start, "peak": mem.peak - start,
           "local_parameter_bytes": local_bytes(model.parameters())}
    Path(args.out, f"rank-{acc.process_index}.json").write_text(json.dumps(row))
    from frod_cli.training import distributed as D

    del model, optimizer
    D.shutdown(acc)
    return 0


def nf4_frod(args, acc) -> Dict[str, int]:
    """An NF4 base (packed as FSDP gathers it: float32 here) adapted by FRoD: its parameter bytes whole, then this
    rank's after sharding."""
    from transformers import AutoModelForCausalLM

    from frod_cli.bench.adapters import adapt
    from frod_cli.bench.quantized import quant_bnb_config
    from frod_cli.models import keep_one_4bit_format, quantize_built

    quant = quant_bnb_config("nf4", torch.float32)
    quant.bnb_4bit_quant_storage = torch.float32
    base = causal_lm(args.fsdp_bytes_shape, args.fsdp_blocks, torch.float32, args.seed, empty=False)
    model = quantize_built(base, AutoModelForCausalLM, quant, torch.float32, "cpu")
    keep_one_4bit_format(model)
    model, _ = adapt("frod", model, args, PAPER_TARGETS)
    one = local_bytes(model.parameters())
    acc.set_model_policy(model, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = acc.prepare(model, optimizer)
    return {"one_process": one, "per_rank": local_bytes(model.parameters())}


def full_step_bytes(model, optimizer) -> int:
    """Trainable plus AdamW state bytes held after one optimizer step on a small batch."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    states = [t for s in getattr(optimizer, "optimizer", optimizer).state.values() for t in s.values()
              if torch.is_tensor(t)]
    return local_bytes([p for p in model.parameters() if p.requires_grad]) + local_bytes(states)


def full_bytes(args, acc) -> Dict[str, int]:
    """method=full: trainable + AdamW bytes in one process (an unsharded copy, here), then this rank's sharded."""
    import copy

    model = causal_lm(args.fsdp_bytes_shape, args.fsdp_blocks, torch.float32, args.seed, empty=False)
    for p in model.parameters():
        p.requires_grad_(True)
    whole = copy.deepcopy(model)
    one = full_step_bytes(whole, torch.optim.AdamW(whole.parameters(), lr=1e-4))
    del whole
    acc.set_model_policy(model, None, shard_trainables=True)
    model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    return {"one_process": one, "per_rank": full_step_bytes(model, optimizer)}


def bytes_worker(args) -> int:
    """One rank of the bytes measurement (both models through one accelerator, one after the other)."""
    from frod_cli.training import distributed as D

    torch.set_num_threads(1)
    acc = fsdp_accelerator(False)
    row = {"rank": acc.process_index, "nf4_parameters": nf4_frod(args, acc),
           "full_trainable_adamw": full_bytes(args, acc)}
    Path(args.out, f"rank-{acc.process_index}.json").write_text(json.dumps(row))
    D.shutdown(acc)
    return 0


def launch(args, part: str, work: Path, extra: List[str]) -> List[Dict[str, Any]]:
    """This benchmark's worker for `part` under torchrun, two processes of one thread; their rank files."""
    import frod_cli

    work.mkdir(parents=True, exist_ok=True)
    root = str(Path(frod_cli.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "frod_cli.bench", "--fsdp-worker", part, "--fsdp-shape", args.fsdp_shape,
           "--fsdp-bytes-shape", args.fsdp_bytes_shape, "--fsdp-blocks", str(args.fsdp_blocks),
           "--sparse-rate", str(args.sparse_rate), "--seed", str(args.seed), "--out", str(work), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"--fsdp {part} failed:\n{r.stderr[-3000:]}")
    return [json.loads((work / f"rank-{i}.json").read_text()) for i in (0, 1)]


def loading(args, work: Path, log) -> Dict[str, Any]:
    out = {}
    for name, extra in (("load_on_rank0", ["--fsdp-meta"]), ("every_rank_loads", [])):
        ranks = launch(args, "load", work / name, extra)
        log(f"# {name}: " + "; ".join(f"rank {r['rank']} +{fmt_bytes(r['after_load'])} loaded, "
                                      f"+{fmt_bytes(r['after_sharding'])} sharded" for r in ranks))
        out[name] = ranks
    r0, r1 = out["load_on_rank0"]
    out["targets"] = {"rank1_after_load_vs_model": ratio(r1["after_load"], r1["model_bytes"]),
                      "rank0_after_adapter_vs_model_plus_bases": ratio(r0["after_adapter"],
                                                                       r0["model_bytes"] + r0["bases_bytes"])}
    return out


def bytes_part(args, work: Path, log) -> Dict[str, Any]:
    ranks = launch(args, "bytes", work / "bytes", [])
    out = {"ranks": ranks, "targets": {}}
    for name in ("nf4_parameters", "full_trainable_adamw"):
        out["targets"][f"{name}_per_rank_vs_one"] = max(ratio(r[name]["per_rank"], r[name]["one_process"])
                                                        for r in ranks)
    log("# bytes: " + ", ".join(f"{k} {v:.3f}" for k, v in out["targets"].items()))
    return out


def table(result: Dict[str, Any]) -> str:
    lines = []
    if "loading" in result:
        lines += ["| run (MiB above the process before loading) | rank | model | bases | after loading | after the adapter | "
                  "after sharding | peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in ("load_on_rank0", "every_rank_loads"):
            for r in result["loading"][name]:
                lines.append(f"| {name} | {r['rank']}{' (meta)' if r['meta'] else ''} | {fmt_bytes(r['model_bytes'])} | "
                             f"{fmt_bytes(r['bases_bytes'])} | {fmt_bytes(r['after_load'])} | "
                             f"{fmt_bytes(r['after_adapter'])} | {fmt_bytes(r['after_sharding'])} | "
                             f"{fmt_bytes(r['peak'])} |")
    if "bytes" in result:
        lines += ["", "| rank (MiB) | NF4 + FRoD parameters: one process | per rank | full: trainable + AdamW, one "
                  "process | per rank |", "|---|---|---|---|---|"]
        for r in result["bytes"]["ranks"]:
            q, f = r["nf4_parameters"], r["full_trainable_adamw"]
            lines.append(f"| {r['rank']} | {fmt_bytes(q['one_process'])} | {fmt_bytes(q['per_rank'])} | "
                         f"{fmt_bytes(f['one_process'])} | {fmt_bytes(f['per_rank'])} |")
    targets = {**result.get("loading", {}).get("targets", {}), **result.get("bytes", {}).get("targets", {})}
    lines.append("# " + ", ".join(f"{k} {v:.3f}" for k, v in targets.items()))
    return "\n".join(lines)


def selected(args) -> bool:
    return bool(args.fsdp or args.fsdp_worker)


def run(args, log) -> int:
    if args.fsdp_worker:
        return load_worker(args) if args.fsdp_worker == "load" else bytes_worker(args)
    parts = [p.strip() for p in args.fsdp_parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        refuse(f"--fsdp-parts must be a comma list of {', '.join(PARTS)}, got {args.fsdp_parts!r}")
    env, t0 = environment("cpu", ["bfloat16", "float32"]), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="frod-fsdp-bench-"))
    result: Dict[str, Any] = {"shape": args.fsdp_shape, "bytes_shape": args.fsdp_bytes_shape,
                              "blocks": args.fsdp_blocks, "processes": 2, "threads_per_process": 1}
    try:
        if "load" in parts:
            result["loading"] = loading(args, work, log)
        if "bytes" in parts:
            result["bytes"] = bytes_part(args, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result.update(environment=env, wall_s=time.perf_counter() - t0)
    return write_result(result, table(result), args.out or f"bench_out/fsdp-{args.fsdp_shape}.json")


def add_args(ap) -> None:
    g = ap.add_argument_group("--fsdp: memory per process under train.fsdp, two CPU processes against one")
    g.add_argument("--fsdp", action="store_true", help="run the sharded-training memory benchmark")
    g.add_argument("--fsdp-parts", default="load,bytes", help="load (rank-0 loading), bytes (NF4 and full per rank)")
    g.add_argument("--fsdp-shape", default="llama7b", choices=sorted(SHAPES), help="the loading model's shape")
    g.add_argument("--fsdp-bytes-shape", default="small", choices=sorted(SHAPES), help="the bytes part's shape")
    g.add_argument("--fsdp-blocks", type=int, default=4, help="transformer blocks of both models")
    g.add_argument("--fsdp-worker", choices=PARTS, default=None, help=argparse.SUPPRESS)
    g.add_argument("--fsdp-meta", action="store_true", help=argparse.SUPPRESS)
