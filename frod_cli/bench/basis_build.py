"""--build: time to a ready FRoD adapter on LLaMA-shaped stacks of target layers (issue 17): the cold
decomposition per category, the cache hit (hashing included), and the categories split over processes.

It measures the core's basis build (frod_cli.frod.apply_frod with an explicit cache directory, a device, and
under torchrun), not a training method: the method registry adds nothing here but where its cache lives.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from frod_cli.bench.common import PeakRSS, environment, int_list, loadavg, rss_bytes, write_result

BUILD_SHAPES = {  # hidden, intermediate, k/v rows (GQA); the real layer shapes of each model
    "llama7b": (4096, 11008, 4096),
    "llama70b": (8192, 28672, 1024),
    "tiny": (64, 160, 32),
}
PAPER_7B_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"  # the paper's commonsense recipe
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


def build_layer_shapes(shape: str) -> Dict[str, tuple]:
    h, inter, kv = BUILD_SHAPES[shape]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def llama_stack(shape: str, blocks: int, targets: List[str], seed: int) -> torch.nn.Module:
    """`layers.<i>.self_attn.<q,k,v,o>_proj` / `layers.<i>.mlp.<gate,up,down>_proj` as bias-free nn.Linear of
    the model's real shapes, random N(0, 0.02) float32 (seeded: every process builds the same weights); only
    the targeted roles are built (the decomposition needs nothing else)."""
    shapes = build_layer_shapes(shape)
    g = torch.Generator().manual_seed(seed)
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList()
    for _ in range(blocks):
        block = torch.nn.Module()
        block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
        for role in targets:
            out_f, in_f = shapes[role]
            layer = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
            layer.weight = torch.nn.Parameter(torch.randn(out_f, in_f, generator=g).mul_(0.02), requires_grad=False)
            setattr(block.mlp if role in MLP_ROLES else block.self_attn, role, layer)
        root.layers.append(block)
    return root


def build_config(args):
    from frod_cli.frod import FrodConfig

    return FrodConfig(target_modules=[t.strip() for t in args.targets.split(",")], sparse_rate=args.sparse_rate,
                      seed=args.seed, basis_dtype=args.basis_dtype)


def timed_apply(model, args, **kw):
    from frod_cli.frod import apply_frod, basis_report

    t0 = time.perf_counter()
    adapted = apply_frod(model, build_config(args), **kw)
    return adapted, time.perf_counter() - t0, basis_report(adapted)


def category_row(c: Dict[str, Any], h: Dict[str, Any]) -> Dict[str, Any]:
    """One category's cold build (report `c`) against its cache hit (report `h`)."""
    hit_s = h["hash_s"] + h["load_s"]
    return {"category": c["category"], "layers": c["layers"], "n": c["n"], "cold_s": c["seconds"],
            "cold_cpu_s": c["cpu_s"], "cold_hash_s": c["hash_s"], "cold_store_s": c["store_s"],
            "hit_s": hit_s, "hit_cpu_s": h["cache_cpu_s"], "hit_hash_s": h["hash_s"], "hit_load_s": h["load_s"],
            "hit_vs_cold": hit_s / c["seconds"], "hit_vs_cold_cpu": h["cache_cpu_s"] / max(c["cpu_s"], 1e-9),
            "hit_source": h["source"], "device_peak_bytes": c["device_peak_bytes"]}


def build_cold_and_hit(args, blocks: int, cache_dir: str, log) -> Dict[str, Any]:
    """One process at --threads: apply_frod through an empty cache (cold: decomposition, hashing, writing),
    then on an identical copy of the base (hit: hashing and reading). Per category and in total."""
    from frod_cli.frod.cache import clear_cache

    clear_cache(cache_dir)
    base = llama_stack(args.build_shape, blocks, build_config(args).target_modules, args.seed)
    twin = copy.deepcopy(base)
    with PeakRSS() as mem:
        cold, cold_wall, cold_rep = timed_apply(base, args, cache_dir=cache_dir, device=args.device)
    hit, hit_wall, hit_rep = timed_apply(twin, args, cache_dir=cache_dir, device=args.device)
    same = all(torch.equal(a, b) for a, b in zip(cold.state_dict().values(), hit.state_dict().values()))
    rows = [category_row(c, h) for c, h in zip(cold_rep, hit_rep)]
    for r in rows:
        log(f"# {blocks} blocks {r['category']}: cold {r['cold_s']:.2f} s ({r['cold_cpu_s']:.2f} CPU s), "
            f"hit {r['hit_s']:.3f} s ({r['hit_cpu_s']:.3f} CPU s)")
    cold_s, hit_s = sum(r["cold_s"] for r in rows), sum(r["hit_s"] for r in rows)
    cold_cpu, hit_cpu = sum(r["cold_cpu_s"] for r in rows), sum(r["hit_cpu_s"] for r in rows)
    return {"blocks": blocks, "rows": rows, "cold_decomposition_s": cold_s, "hit_s": hit_s,
            "hit_vs_cold": hit_s / cold_s, "cold_decomposition_cpu_s": cold_cpu, "hit_cpu_s": hit_cpu,
            "hit_vs_cold_cpu": hit_cpu / max(cold_cpu, 1e-9),
            "cold_wall_s": cold_wall, "hit_wall_s": hit_wall, "hit_equals_cold": same,
            "peak_rss_bytes_cold": mem.peak, "cache_bytes": sum(os.path.getsize(os.path.join(cache_dir, f))
                                                                for f in os.listdir(cache_dir))}


def worker_command(args, procs: int, blocks: int, out: Path) -> List[str]:
    """torchrun of this benchmark's --build-worker, `procs` processes at 1 thread each (python -m frod_cli.bench)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            "-m", "frod_cli.bench", "--build-worker", "--build-shape", args.build_shape, "--blocks", str(blocks),
            "--targets", args.targets, "--sparse-rate", str(args.sparse_rate), "--seed", str(args.seed),
            "--basis-dtype", args.basis_dtype, "--threads", "1", "--out", str(out)]


def build_ranks(args, blocks: int, work: Path, log) -> Dict[str, Any]:
    """Wall time to a ready adapter (no cache), one process at 1 thread against --ranks processes at 1 thread
    each over gloo (torchrun), each building the same base; with the adapters' fingerprints compared."""
    import frod_cli

    results = {}
    package_root = str(Path(frod_cli.__file__).resolve().parents[1])  # a checkout that is not installed
    for procs in (1, args.ranks):
        out = work / f"ranks-{procs}"
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        r = subprocess.run(worker_command(args, procs, blocks, out), env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"--build ranks={procs} failed:\n{r.stderr[-3000:]}")
        results[procs] = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(procs)]
        log(f"# {procs} process(es): ready in " + ", ".join(f"{x['ready_s']:.1f} s" for x in results[procs]))
    one, many = results[1][0], results[args.ranks]
    return {"blocks": blocks, "processes": args.ranks, "one_process_s": one["ready_s"],
            "per_rank_s": [x["ready_s"] for x in many], "ratio": max(x["ready_s"] for x in many) / one["ready_s"],
            "one_process_cpu_s": one["cpu_s"], "per_rank_cpu_s": [x["cpu_s"] for x in many],
            "ratio_cpu": max(x["cpu_s"] for x in many) / one["cpu_s"],
            "bit_identical": len({x["fingerprint"] for x in many} | {one["fingerprint"]}) == 1,
            "owners": many[0]["owners"], "peak_rss_bytes": {"one": one["peak_rss_bytes"],
                                                            "per_rank": [x["peak_rss_bytes"] for x in many]},
            "rss_after_load_bytes": [x["rss_after_load_bytes"] for x in many]}


def build_worker(args) -> int:
    """One rank of build_ranks (started by torchrun): build the base, apply FRoD, write rank-<r>.json."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    base = llama_stack(args.build_shape, args.blocks_list[0], build_config(args).target_modules, args.seed)
    loaded = rss_bytes()
    if world > 1:
        dist.barrier()  # every rank starts the clock together
    cpu0 = time.process_time()
    with PeakRSS() as mem:
        model, ready, report = timed_apply(base, args, cache_dir=None)
    cpu = time.process_time() - cpu0  # this rank's work (its share, the broadcasts), not its waiting
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "ready_s": ready, "cpu_s": cpu, "fingerprint": h.hexdigest(), "rss_after_load_bytes": loaded,
        "peak_rss_bytes": mem.peak, "owners": {r["category"]: r["rank"] for r in report}}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def fit_blocks(points: List[Dict[str, Any]], blocks: int, field: str = "cold_s") -> Dict[str, float]:
    """Per category, `field` (cold_s, cold_cpu_s) at `blocks` from the measured points: the line through the two
    largest block counts (the cost is a fixed part, eigh and the n x n factors, plus a part linear in the
    layers), or proportional to the blocks from one point (an upper bound)."""
    pts = sorted(points, key=lambda p: p["blocks"])[-2:]
    out = {}
    for i, row in enumerate(pts[-1]["rows"]):
        if len(pts) == 1:
            out[row["category"]] = row[field] * blocks / pts[-1]["blocks"]
        else:
            (b0, t0), (b1, t1) = [(p["blocks"], p["rows"][i][field]) for p in pts]
            out[row["category"]] = t1 + (t1 - t0) / (b1 - b0) * (blocks - b1)
    return out


def build_table(result: Dict[str, Any]) -> str:
    if "points" not in result:
        return ranks_line(result.get("ranks"))
    last = result["points"][-1]
    lines = ["| category | layers | cold s (CPU s) | hit s (hash + read; CPU s) | hit / cold, wall (CPU) "
             "| cold at 32 blocks, s (CPU s) | at 80 blocks |", "|---|---|---|---|---|---|---|"]
    e32, e80 = result["extrapolated"]["32"], result["extrapolated"]["80"]
    c32, c80 = result["extrapolated_cpu"]["32"], result["extrapolated_cpu"]["80"]
    for r in last["rows"]:
        k = r["category"]
        lines.append(f"| {k} | {r['layers']} | {r['cold_s']:.2f} ({r['cold_cpu_s']:.2f}) | {r['hit_s']:.3f} "
                     f"({r['hit_hash_s']:.3f} + {r['hit_load_s']:.3f}; {r['hit_cpu_s']:.3f}) | {r['hit_vs_cold']:.4f} "
                     f"({r['hit_vs_cold_cpu']:.4f}) | {e32[k]:.0f} ({c32[k]:.0f}) | {e80[k]:.0f} ({c80[k]:.0f}) |")
    lines.append(f"| all | | {last['cold_decomposition_s']:.2f} ({last['cold_decomposition_cpu_s']:.2f}) | "
                 f"{last['hit_s']:.3f} ({last['hit_cpu_s']:.3f}) | {last['hit_vs_cold']:.4f} "
                 f"({last['hit_vs_cold_cpu']:.4f}) | {sum(e32.values()):.0f} ({sum(c32.values()):.0f}) | "
                 f"{sum(e80.values()):.0f} ({sum(c80.values()):.0f}) |")
    text = "\n".join(lines) + (f"\n# apply_frod wall: cold {last['cold_wall_s']:.1f} s, hit "
                               f"{last['hit_wall_s']:.1f} s; hit adapter equals cold: {last['hit_equals_cold']}")
    return text + ("\n" + ranks_line(result["ranks"]) if result.get("ranks") else "")


def ranks_line(rk: Optional[Dict[str, Any]]) -> str:
    if not rk:
        return ""
    ready = ", ".join(f"{s:.1f}" for s in rk["per_rank_s"])
    return (f"# {rk['processes']} processes x 1 thread: ready in {ready} s "
            f"vs 1 process x 1 thread {rk['one_process_s']:.1f} s: {rk['ratio']:.3f}x (CPU seconds "
            f"{', '.join(f'{s:.1f}' for s in rk['per_rank_cpu_s'])} vs {rk['one_process_cpu_s']:.1f}: "
            f"{rk['ratio_cpu']:.3f}x); bit identical: {rk['bit_identical']}")


def selected(args) -> bool:
    return bool(args.build or args.build_worker)


def run(args, log) -> int:
    args.blocks_list = int_list(args.blocks, "--blocks")
    if args.build_worker:
        return build_worker(args)
    torch.set_num_threads(args.threads)
    env, t0 = environment(args.device, [args.basis_dtype]), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="frod-build-bench-"))
    cache_dir = args.cache_dir or str(work / "cache")
    parts = {p.strip() for p in args.parts.split(",")}
    try:
        result = {"build_shape": args.build_shape, "layer_shapes": build_layer_shapes(args.build_shape),
                  "targets": args.targets, "threads": args.threads, "device": args.device}
        if "cache" in parts:
            points = [build_cold_and_hit(args, b, cache_dir, log) for b in args.blocks_list]
            result.update(points=points, extrapolated={str(b): fit_blocks(points, b) for b in (32, 80)},
                          extrapolated_cpu={str(b): fit_blocks(points, b, "cold_cpu_s") for b in (32, 80)})
        if args.ranks > 1 and "ranks" in parts:
            result["ranks"] = build_ranks(args, args.blocks_list[-1], work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = loadavg()
    result.update(environment=env, wall_s=time.perf_counter() - t0)
    return write_result(result, build_table(result), args.out or f"bench_out/build-{args.build_shape}.json")


def add_args(ap) -> None:
    g = ap.add_argument_group("--build: time to a ready FRoD adapter (basis on the device, cache, ranks)")
    g.add_argument("--build", action="store_true", help="run the basis-build benchmark instead of train steps")
    g.add_argument("--build-shape", default="llama7b", choices=sorted(BUILD_SHAPES),
                   help="real layer shapes of LLaMA-2-7B / 70B (tiny: tests)")
    g.add_argument("--blocks", default="2", help="transformer blocks (comma list: one point each, for the fit)")
    g.add_argument("--targets", default=PAPER_7B_TARGETS, help="roles to adapt (comma list)")
    g.add_argument("--ranks", type=int, default=2, help="processes of the split measurement (0: skip it)")
    g.add_argument("--parts", default="cache,ranks", help="what to measure: cache (cold and hit), ranks (split)")
    g.add_argument("--basis-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--cache-dir", default=None, help="basis cache to use (default: a temporary one, removed)")
    g.add_argument("--build-worker", action="store_true", help=argparse.SUPPRESS)
