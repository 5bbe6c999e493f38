"""--fsdp-step: one optimizer step under FSDP2 (torch's fully_shard), several processes on this host over gloo (issue 27).

Methods (the train step's names, built through the registry): `full`, fine-tuned the ZeRO-3 way (every weight
sharded, its gradient reduce-scattered into the shards after every micro-batch, AdamW on the shards); our FRoD
per micro-batch (`frod:micro_batch`) and with accumulation windows over the sharded weights (`frod:window`), as
`frod train` shards it: the frozen weights sharded, lambda and S whole on every rank (fully_shard's
ignored_params) and averaged over the ranks once per optimizer step (training/distributed.average_gradients).
Units: the model's layer classes (_no_split_modules, the embeddings' holder left in the root), then the root.

The parent starts torchrun (--fsdp-step-procs processes, --threads threads each) on this module's worker. Every rank
builds the same seeded base and its own --grad-accum micro-batches of --batch x --seq (the preset's by default:
each rank gets the one-process benchmark's micro-batch), then runs the train step's measurement (warmup, memory
probe, timed steps, --interleave: frod_cli/bench/train_step.measure). One more step per method reads the resident
set (after gc and malloc_trim) right before its window opens and right before it closes, after the last backward:
what a window holds between micro-batches, against `window_buffer_bytes` (per rank: one shard of W and of its
float32 gradient per windowed weight); for the other methods the same two readings around their micro-batches.
Rank 0's figures are the result; every rank's step times are kept.

    python scripts/bench.py --fsdp-step --preset bert768 --grad-accum 8 --steps 2 --interleave
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from frod_cli.bench.adapters import build, check_names, frod_accumulation, is_our_frod
from frod_cli.bench.common import (environment, fmt_bytes, fmt_r, loadavg, malloc_trim, params_buffers_bytes, ratio,
                                   refuse, rss_bytes, write_result)
from frod_cli.bench.presets import PRESETS
from frod_cli.paths import BASIS_CACHE

DEFAULT_METHODS = "full,frod:micro_batch,frod:window"
FORWARDED = ("preset", "methods", "batch", "seq", "steps", "warmup", "dtype", "threads", "sparse_rate", "lora_r", "lr",
             "seed", "layers", "hidden", "intermediate", "grad_accum", "warmup_micro_batches", "probe_micro_batches")
SWITCHES = ("interleave", "probe_timed", "reverse_alternate", "quiet")


def add_args(ap) -> None:
    g = ap.add_argument_group("--fsdp-step: the train step under FSDP2, processes over gloo on this host")
    g.add_argument("--fsdp-step", action="store_true", help=f"run the FSDP train-step benchmark (default --methods "
                                                            f"{DEFAULT_METHODS}; the train step's flags apply per rank)")
    g.add_argument("--fsdp-step-procs", type=int, default=2, help="processes (ranks), each with --threads threads")
    g.add_argument("--fsdp-step-worker", action="store_true", help=argparse.SUPPRESS)


def selected(args) -> bool:
    return bool(args.fsdp_step or args.fsdp_step_worker)


def run(args, log) -> int:
    if args.fsdp_step_worker:
        return worker(args, log)
    if args.device != "cpu":
        refuse("--fsdp-step runs its processes on the CPU over gloo; drop --device")
    if args.fsdp_step_procs < 2:
        refuse("--fsdp-step-procs must be >= 2 (one process shards nothing)")
    if args.grad_accum < 1:
        refuse("--grad-accum must be >= 1")
    args.methods = args.methods or DEFAULT_METHODS
    check_names([m.strip() for m in args.methods.split(",") if m.strip()])
    env, t0 = environment(args.device, [args.dtype]), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="frod-fsdp-bench-"))
    try:
        ranks = launch(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = dict(ranks[0], environment=env, wall_s=time.perf_counter() - t0, processes=args.fsdp_step_procs,
                  rank_step_s=[{row["method"]: row["step_s"]["total"]["median"] for row in r["rows"]} for r in ranks])
    result["environment"]["loadavg_end"] = loadavg()
    return write_result(result, fsdp_table(result), args.out or f"bench_out/fsdp-step-{args.preset}.json")


def launch(args, work: Path) -> List[Dict[str, Any]]:
    """torchrun of the worker; the ranks' results. The basis cache is a temporary directory of the launch, so the
    second FRoD method reads the bases the first computed."""
    import frod_cli

    package_root = str(Path(frod_cli.__file__).resolve().parents[1])  # a checkout that is not installed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.fsdp_step_procs), "-m", "frod_cli.bench", "--fsdp-step-worker", "--out", str(work)]
    for name in FORWARDED:
        value = getattr(args, name, None)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    cmd += [f"--{name.replace('_', '-')}" for name in SWITCHES if getattr(args, name, False)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), BASIS_CACHE: str(work / "basis-cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run(cmd, env=env, stdout=None if not args.quiet else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"--fsdp-step: the worker launch failed:\n{r.stderr[-3000:]}")
    return [json.loads((work / f"rank-{i}.json").read_text()) for i in range(args.fsdp_step_procs)]


# ---- one rank ------------------------------------------------------------------------------------------------
def worker(args, log) -> int:
    """One rank (started by torchrun): build, shard, measure (train_step's machinery), write rank-<r>.json."""
    import torch.distributed as dist

    from frod_cli.bench.train_step import add_ratios, measure, prepare, result_row

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say = log if rank == 0 else (lambda *a, **k: None)
    preset = PRESETS[args.preset]
    s = prepare(args, preset, say)
    s.batches = rank_batches(args, preset, s, rank)
    runners = [sharded_runner(name.strip(), s, args, preset, world, say) for name in args.methods.split(",")
               if name.strip()]
    s.base = None
    gc.collect()
    how = measure(runners, s, args, say)
    held = {r.name: held_between_micro_batches(r, s, args) for r in runners}
    rows = [result_row(r, s) for r in runners]
    add_ratios(rows)
    for row in rows:
        row["held"] = held[row["method"]]
    add_micro_batch_ratio(rows)
    config = {"batch_per_rank": s.batch, "seq": s.seq, "tokens_per_micro_batch_per_rank": s.tokens, "grad_accum": s.K,
              "processes": world, "threads_per_process": torch.get_num_threads(), "hidden": s.hidden,
              "targets": preset.targets, "sparse_rate": args.sparse_rate, "dtype": args.dtype, "steps": args.steps,
              "warmup": args.warmup, "seed": args.seed, "full": "ZeRO-3: gradients reduce-scattered every micro-batch",
              **how}
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(
        {"preset": preset.name, "description": preset.description, "rank": rank, "config": config, "rows": rows},
        default=str))
    del runners, s
    dist.barrier()
    dist.destroy_process_group()
    return 0


def rank_batches(args, preset, s, rank: int) -> List[Dict[str, torch.Tensor]]:
    """This rank's K micro-batches (a generator of its own: data parallel)."""
    g = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))
    batches = []
    for _ in range(s.K):
        batch = {k: v.to(s.device) for k, v in preset.make_batch(s.base, s.batch, s.seq, g).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(getattr(torch, args.dtype))
        batches.append(batch)
    return batches


def shard(model: torch.nn.Module, ignored: set) -> None:
    """fully_shard on every layer-class module (_no_split_modules less the embeddings' holders), then the root."""
    from torch.distributed.fsdp import fully_shard

    from frod_cli.training.distributed import embedding_holders

    names = set(getattr(model, "_no_split_modules", None) or []) - embedding_holders(model)
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def sharded_runner(name: str, s, args, preset, world: int, log):
    """Method `name` on a copy of the base, through the registry, then sharded; its AdamW on what trains (the
    shards for full, the whole lambda and S otherwise), and for the adapter methods the average over the ranks."""
    from frod_cli.bench.train_step import Runner
    from frod_cli.training.distributed import average_gradients

    model = copy.deepcopy(s.base)
    method = build(name, args, preset.targets, **({"basis_cache": True} if is_our_frod(name) else {}))
    c0, t0 = time.process_time(), time.perf_counter()
    model = method.adapt(model)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.train()
    trainables = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainables)
    shard(model, set() if name == "full" else set(trainables))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    r = Runner(name=name, model=model, opt=opt, build_s=build_s, build_cpu_s=build_cpu_s, trainable=count,
               pb_bytes=params_buffers_bytes(model), resident_build_bytes=0, init_max_abs_diff=None)
    if frod_accumulation(name) == "window":
        r.window = method.accumulation
    if name != "full":
        r.after_backward = lambda: average_gradients(trainables, world)
    log(f"  built {name:<20} in {build_s:7.2f} s; trainable {count:,}; this rank's params+buffers "
        f"{r.pb_bytes / 2**20:.1f} MiB")
    return r


def held_between_micro_batches(r, s, args) -> Dict[str, Any]:
    """One more step, not timed and not applied (zero_grad, no optimizer step: every rank alike): the resident set
    right before the window opens (or the micro-batches start) and right before it closes, after the last
    backward; with the window's own count of what it holds and window_buffer_bytes' figure for the layers that
    took it (rank 0 holds the larger share of an uneven split: the figure is its)."""
    from frod_cli.frod import window_buffer_bytes

    batches = s.batches[:getattr(args, "probe_micro_batches", None) or s.K]
    gc.collect()
    malloc_trim()
    before = rss_bytes()
    context = r.window(r.model, s.K) if r.window is not None else contextlib.nullcontext()
    with context as w:
        for batch in batches:
            (s.loss_fn(r.model(**batch)) / s.K).backward()
        gc.collect()
        malloc_trim()
        inside = rss_bytes()
        counted = None if w is None else w.memory_bytes()
        planned = None if w is None else window_buffer_bytes(r.model, layers=w.layers)
    if r.after_backward is not None:
        r.after_backward()
    r.opt.zero_grad(set_to_none=True)
    return {"rss_before": before, "rss_inside": inside, "extra": inside - before, "counted": counted,
            "planned": planned, "micro_batches": len(batches)}


def add_micro_batch_ratio(rows: List[Dict[str, Any]]) -> None:
    """Each row's step time over frod:micro_batch's, and what its window held over the per-micro-batch step's."""
    by = {row["method"]: row for row in rows}
    ref = by.get("frod:micro_batch")
    for row in rows:
        row["vs_frod_micro_batch"] = None if ref is None else ratio(row["step_s"]["total"]["median"],
                                                                     ref["step_s"]["total"]["median"])
        held, base = row["held"], (ref or {}).get("held")
        if held.get("planned") and base is not None:
            # what the window adds to the per-micro-batch step's readings (both: lambda and S grads, FSDP's buffers)
            held["window_extra"] = held["extra"] - base["extra"]
            held["window_extra_vs_planned"] = held["window_extra"] / held["planned"]


def fsdp_table(result: Dict[str, Any]) -> str:
    c = result["config"]
    head = (f"{result['preset']} under FSDP2: {result['processes']} processes x {c['threads_per_process']} thread(s) "
            f"over gloo; per rank {c['batch_per_rank']} x {c['seq']} tokens x {c['grad_accum']} micro-batches per "
            f"optimizer step; median of {c['steps']} steps after {c['warmup']} warmup; times per optimizer step "
            f"(rank 0)")
    lines = [head, "", "| method | step s | min-max s | fwd s | bwd s | window exit s | x full | x frod:micro_batch "
             "| rank steps s | peak extra MiB | held between micro-batches MiB (window: counted / planned) |",
             "|" + "---|" * 11]
    for row in result["rows"]:
        t, h, w = row["step_s"], row["held"], row["held"].get("counted")
        ranks = " / ".join(f"{r[row['method']]:.2f}" for r in result["rank_step_s"])
        window = "" if not w else (f" ({fmt_bytes(w['total'])} / {fmt_bytes(h['planned'])}; over micro_batch "
                                   f"{fmt_bytes(h.get('window_extra'))}, {fmt_r(h.get('window_extra_vs_planned'))}x "
                                   f"the plan)")
        lines.append(f"| {row['method']} | {t['total']['median']:.3f} | {t['total']['min']:.2f}-{t['total']['max']:.2f} "
                     f"| {t['forward']['median']:.3f} | {t['backward']['median']:.3f} | "
                     f"{t['window_exit']['median']:.3f} | {fmt_r((row.get('vs_full') or {}).get('step'))} | "
                     f"{fmt_r(row.get('vs_frod_micro_batch'))} | {ranks} | {fmt_bytes(row['memory']['step_peak_extra'])} "
                     f"| {fmt_bytes(h['extra'])}{window} |")
    return "\n".join(lines)
