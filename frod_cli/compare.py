"""Compare methods: run them (`frod compare recipe=<name>`) and report (`frod compare <sweep_dir>`).

`frod compare recipe=<name> [compare.stage=search|compare|both] [compare.jobs=2] [key=value ...]` runs
every method of the recipe's `compare` block (frod_cli.config.CompareConfig) through `frod train`, each
in its own process, skipping runs finished by an earlier call, then writes the report below to
`<run dir>/report`. `frod compare <sweep_dir> [--out DIR]` (or `python -m frod_cli.compare`) only
reports on run directories that already exist, e.g. a `frod train -m method=...` sweep.

Reads every run directory under `sweep_dir` (a directory holding `metrics.json`; `merged/` and
`adapter/` are skipped), groups runs by method (plus any other override that varies across the sweep,
except the seed) and writes to `out_dir` (default `<sweep_dir>/compare`):

  report.md              a Markdown table (mean +- std over seeds) and the tables below
  summary.json           the same numbers, machine-readable
  loss_curves.png        training loss versus optimizer step, every group on one plot: the mean over
                         seeds, with a +-1 std band when a group has several seeds
  metric_vs_params.png   the final metric versus the trainable-parameter percentage (log x)
  steps_to_loss.png      optimizer steps each group needed to reach training-loss thresholds

Inputs (written by frod_cli.train): `metrics.jsonl` log lines {step, loss, lr, ...} (evaluation lines
carry `split` and are not training loss), `metrics.json` {method, objective, objective_value,
validation{...}, test{...}, trainable_params, trainable_percent, steps, train_time_s, wall_time_s},
and `.hydra/config.yaml` / `.hydra/overrides.yaml` for the seed and the overrides.

Steps-to-threshold uses the training loss smoothed by a trailing moving average over `smooth` log points
(`smooth=1`: raw); a run that never reaches a threshold counts as not reached (`None`), and a group's
value is the mean over the seeds that reached it, with the count. Thresholds default to fractions
(0.9, 0.75, 0.5, 0.25) of the mean initial smoothed loss over all runs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from frod_cli import FrodCliError
from frod_cli.runs import (atomic_dir, atomic_write_json, atomic_write_text, find_runs, read_metrics, read_overrides,
                           read_run)
from frod_cli.runs.plots import pyplot, save_fig
from frod_cli.runs.reader import SEED_KEYS

DEFAULT_FRACTIONS = (0.9, 0.75, 0.5, 0.25)


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------
def _key(o: str) -> str:
    return o.lstrip("+~").partition("=")[0]


def group_runs(runs: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Runs by label: the method plus the overrides that vary among that method's runs (seed excluded),
    so a comparison of methods (each with its own rates) reads `frod`, `lora`, ..., and a search reads
    `frod optimizer.lr_scale=3.0`."""
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for method, rs in by_method.items():
        sets = [{o.lstrip("+") for o in r["overrides"] if _key(o) not in (*SEED_KEYS, "method")} for r in rs]
        varying = set().union(*sets) - set.intersection(*sets)
        for r, ov in zip(rs, sets):
            groups.setdefault(" ".join([method, *sorted(ov & varying)]), []).append(r)
    return groups


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------
def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def steps_to_reach(loss: List[tuple], threshold: float, window: int) -> Optional[int]:
    """First logged step whose smoothed training loss is <= threshold; None if never."""
    if not loss:
        return None
    steps = [s for s, _ in loss]
    sm = smooth([l for _, l in loss], window)
    hit = np.nonzero(sm <= threshold)[0]
    return int(steps[hit[0]]) if len(hit) else None


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def _metric(final: Dict[str, Any], split: str, key: str) -> Optional[float]:
    v = (final.get(split) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _per_step(final: Dict[str, Any]) -> Optional[float]:
    steps = final.get("steps")
    t = final.get("train_time_s", final.get("wall_time_s"))
    if not steps or t is None:
        return None
    return float(t) / float(steps)


def mean_curve(runs: List[Dict[str, Any]]):
    """(steps, mean, std) of the runs' raw training loss on the steps every run logged (up to the
    shortest run; other runs are interpolated onto the first run's steps)."""
    curves = [r["loss"] for r in runs if r["loss"]]
    if not curves:
        return None
    last = min(c[-1][0] for c in curves)
    grid = np.array([s for s, _ in curves[0] if s <= last], dtype=float)
    ys = np.stack([np.interp(grid, [s for s, _ in c], [l for _, l in c]) for c in curves])
    return grid, ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(grid))


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _fmt(ms: Dict[str, Any], digits: int = 4) -> str:
    if ms.get("mean") is None:
        return "-"
    if ms["n"] > 1:
        return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f}"


def build_report(
    sweep_dir: str,
    out_dir: Optional[str] = None,
    objective: Optional[str] = None,
    thresholds: Optional[Sequence[float]] = None,
    smooth_window: int = 5,
) -> Dict[str, Any]:
    """Write report.md, summary.json and the PNGs to `out_dir` (default <sweep_dir>/compare); return
    the summary. `objective`: the metric compared (default: the runs' task.objective)."""
    root = Path(sweep_dir)
    out = Path(out_dir) if out_dir else root / "compare"
    jobs = [d for d in find_runs(str(root)) if out not in d.parents and d != out]
    if not jobs:
        raise FrodCliError(f"no run directory (with metrics.json) under {sweep_dir}")
    runs = [read_run(d) for d in jobs]
    objective = objective or next((r["final"].get("objective") for r in runs if r["final"].get("objective")), None)
    if objective is None:
        raise FrodCliError("the runs name no objective: pass objective=<metric>")
    mode = next((r["final"].get("objective_mode") for r in runs if r["final"].get("objective_mode")), "max")
    # The split of the headline number: test where every run has one, else validation.
    split = "test" if all(_metric(r["final"], "test", objective) is not None for r in runs) else "validation"
    groups = group_runs(runs)

    starts = [smooth([l for _, l in r["loss"]], smooth_window)[0] for r in runs if r["loss"]]
    loss_start = float(np.mean(starts)) if starts else None
    if thresholds is None:
        # Fractions of the starting loss mean something only for a loss that starts positive and falls (not for
        # GRPO's policy loss, zero on average at every step by construction)
        thresholds = [round(loss_start * f, 4) for f in DEFAULT_FRACTIONS] if (loss_start or 0) > 1e-3 else []
    thresholds = [float(t) for t in thresholds]

    metric_keys: List[str] = []
    for r in runs:
        for k in (r["final"].get(split) or {}):
            if k not in metric_keys:
                metric_keys.append(k)

    summary: Dict[str, Any] = {
        "sweep_dir": str(root), "objective": objective, "objective_mode": mode, "split": split,
        "smooth_window": smooth_window, "thresholds": thresholds, "loss_start": loss_start,
        "groups": {label: _group_summary(rs, objective, split, metric_keys, thresholds, smooth_window)
                   for label, rs in groups.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "loss_curves": _plot_curves(groups, out / "loss_curves.png"),
        "metric_vs_params": _plot_scatter(summary, out / "metric_vs_params.png"),
        "steps_to_loss": _plot_reach(summary, out / "steps_to_loss.png"),
    }
    summary["files"] = {k: os.path.basename(v) for k, v in files.items() if v}
    atomic_write_text(str(out / "report.md"), _markdown(summary, metric_keys))
    atomic_write_json(str(out / "summary.json"), summary)
    return summary


def _group_summary(rs: List[Dict[str, Any]], objective: str, split: str, metric_keys: List[str],
                   thresholds: Sequence[float], smooth_window: int) -> Dict[str, Any]:
    """One group's numbers: mean +- std over its runs, and the steps each needed to reach each loss threshold."""
    finals = [r["final"] for r in rs]
    reach = {}
    for t in thresholds:
        per_seed = [steps_to_reach(r["loss"], t, smooth_window) for r in rs]
        ms = mean_std([s for s in per_seed if s is not None])
        reach[str(t)] = {**ms, "reached": sum(s is not None for s in per_seed), "runs": len(rs), "per_run": per_seed}
    return {
        "method": rs[0]["method"],
        "runs": [r["dir"] for r in rs],
        "seeds": [r["seed"] for r in rs],
        "validation": {objective: mean_std([_metric(f, "validation", objective) for f in finals])},
        split: {k: mean_std([_metric(f, split, k) for f in finals]) for k in metric_keys},
        "trainable_percent": mean_std([f.get("trainable_percent") for f in finals]),
        "trainable_params": mean_std([f.get("trainable_params") for f in finals]),
        "steps": mean_std([f.get("steps") for f in finals]),
        "time_per_step_s": mean_std([_per_step(f) for f in finals]),
        "wall_time_s": mean_std([f.get("wall_time_s") for f in finals]),
        "steps_to_loss": reach,
    }


def _markdown(s: Dict[str, Any], metric_keys: List[str]) -> str:
    obj, split, groups = s["objective"], s["split"], s["groups"]
    lines = [f"# Method comparison: {s['sweep_dir']}", "",
             f"Objective `{obj}` ({s['objective_mode']}); headline split: `{split}`; "
             f"mean ± std over seeds (n = runs per row). Model selection: validation only.", ""]
    shown = [k for k in metric_keys if split != "validation" or k != obj]
    head = ["method", "n", f"validation {obj}", *[f"{split} {k}" for k in shown],
            "trainable %", "trainable params", "steps", "s / step", "wall time (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in groups.items():
        n = len(g["runs"])
        row = [label.replace("|", "\\|"), str(n), _fmt(g["validation"][obj]),
               *[_fmt(g[split][k]) for k in shown],
               _fmt(g["trainable_percent"], 3),
               f"{g['trainable_params']['mean']:,.0f}" if g["trainable_params"]["mean"] is not None else "-",
               _fmt(g["steps"], 0), _fmt(g["time_per_step_s"], 4), _fmt(g["wall_time_s"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    if s["thresholds"]:
        lines += ["", f"## Steps to reach a training loss (moving average over {s['smooth_window']} log points)", "",
                  "Mean over the seeds that reached it (reached/runs); `-`: never reached.", ""]
        head = ["method", *[f"loss ≤ {t:g}" for t in s["thresholds"]]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, g in groups.items():
            cells = []
            for t in s["thresholds"]:
                r = g["steps_to_loss"][str(t)]
                cells.append("-" if r["mean"] is None else f"{_fmt(r, 1)} ({r['reached']}/{r['runs']})")
            lines.append("| " + " | ".join([label.replace("|", "\\|"), *cells]) + " |")
    elif s.get("loss_start") is not None:
        lines += ["", f"No steps-to-loss table: the training loss starts at {s['loss_start']:.3g} (smoothed), not a "
                  "positive loss that falls (GRPO's policy loss is zero on average by construction); read the "
                  "objective's curves, or give thresholds with `frod compare <dir> --thresholds ...`."]
    lines += ["", "## Figures", ""]
    for name in s.get("files", {}).values():
        lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


def _plot_curves(groups: Dict[str, List[Dict[str, Any]]], path: Path,
                 title: str = "training loss (mean ± std over seeds)") -> Optional[str]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for label, rs in groups.items():
        c = mean_curve(rs)
        if c is None:
            continue
        x, m, sd = c
        n = sum(1 for r in rs if r["loss"])
        (line,) = ax.plot(x, m, label=f"{label} (n={n})")
        if n > 1:
            ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.2)
        drawn = True
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    ax.set_title(title)
    save_fig(fig, str(path))
    plt.close(fig)
    return str(path)


def _plot_scatter(s: Dict[str, Any], path: Path) -> Optional[str]:
    plt = pyplot()
    obj, split = s["objective"], s["split"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, g in s["groups"].items():
        x, y = g["trainable_percent"]["mean"], (g[split].get(obj) or g["validation"][obj])
        if x is None or x <= 0 or y["mean"] is None:
            continue
        ax.errorbar([x], [y["mean"]], yerr=[y["std"] or 0.0], fmt="o", capsize=3, label=label)
        ax.annotate(label, (x, y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(f"{split} {obj}")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{split} {obj} versus trainable parameters")
    save_fig(fig, str(path))
    plt.close(fig)
    return str(path)


def _plot_reach(s: Dict[str, Any], path: Path) -> Optional[str]:
    if not s["thresholds"]:
        return None
    plt = pyplot()
    labels = list(s["groups"])
    th = s["thresholds"]
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, label in enumerate(labels):
        r = [s["groups"][label]["steps_to_loss"][str(t)] for t in th]
        xs = np.arange(len(th)) + i * width
        ax.bar(xs, [v["mean"] if v["mean"] is not None else 0 for v in r], width,
               yerr=[v["std"] or 0 for v in r], capsize=2, label=label)
        for x, v in zip(xs, r):
            if v["mean"] is None:
                ax.text(x, 0, "×", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(np.arange(len(th)) + width * (len(labels) - 1) / 2)
    ax.set_xticklabels([f"≤ {t:g}" for t in th])
    ax.set_xlabel(f"smoothed training loss threshold (window {s['smooth_window']})")
    ax.set_ylabel("optimizer steps to reach it (× = never)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_fig(fig, str(path))
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------
# The sweep summary (`frod train -m`): one row per job, read and plotted as the report above reads and plots
# ---------------------------------------------------------------------------------------------
SWEEP_COLUMNS = ("trainable_params", "trainable_percent", "steps", "samples_per_s", "train_time_s", "wall_time_s")


def job_rows(sweep_dir: str) -> List[Dict[str, Any]]:
    """One row per finished job under `sweep_dir`: its directory, the overrides that differ between jobs, the
    method, the validation and test metrics, and SWEEP_COLUMNS (each job's own times: its metrics.json measures
    from the job's start, the libraries already imported, so the first job carries no start-up of the process)."""
    runs = [read_run(d) for d in find_runs(sweep_dir)]
    common = set.intersection(*(set(r["overrides"]) for r in runs)) if len(runs) > 1 else set()
    rows = []
    for r in runs:
        final = r["final"]
        row = {"job": os.path.relpath(r["dir"], sweep_dir), "overrides": " ".join(o for o in r["overrides"]
                                                                                    if o not in common),
               "method": final.get("method"), "run": r}
        for split in ("validation", "test"):
            row.update({f"{split}_{k}": v for k, v in (final.get(split) or {}).items()})
        row.update({k: final.get(k) for k in SWEEP_COLUMNS})
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def summarize_sweep(sweep_dir: str) -> Optional[Dict[str, str]]:
    """summary.csv, summary.md (a row per job) and loss_curves.png (every job's training loss) in `sweep_dir`;
    the paths written, or None when no job finished."""
    import csv
    import io

    rows = job_rows(sweep_dir)
    if not rows:
        return None
    metrics = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("validation_", "test_"))))
    cols = ["job", "overrides", "method", *metrics, *SWEEP_COLUMNS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    paths = {k: os.path.join(sweep_dir, f) for k, f in (("csv", "summary.csv"), ("md", "summary.md"),
                                                        ("png", "loss_curves.png"))}
    atomic_write_text(paths["csv"], buf.getvalue())
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    atomic_write_text(paths["md"], f"# Sweep summary: {sweep_dir}\n\n" + "\n".join(md) + "\n")
    curves = {f"{r['job']}: {r['overrides'] or r['method']}"[:90]: [r["run"]] for r in rows}
    _plot_curves(curves, Path(paths["png"]), title=f"{len(rows)} jobs: training loss")
    return paths


# ---------------------------------------------------------------------------------------------
# Running the comparison: `frod compare recipe=<name>` (the `compare` block of the recipe)
# ---------------------------------------------------------------------------------------------
def _scale_tag(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m")


def plan_runs(cc: Any, stage: str, best: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """The runs of one stage: {name, method, overrides} with overrides as Hydra strings."""
    methods = dict(cc.methods)
    if cc.only:
        unknown = [m for m in cc.only if m not in methods]
        if unknown:
            raise FrodCliError(f"compare.only names {unknown}, not in compare.methods ({', '.join(methods)})")
        methods = {m: methods[m] for m in cc.only}
    if not methods:
        raise FrodCliError("compare.methods is empty")
    runs = []
    for m, ov in methods.items():
        ov = [str(o) for o in (ov or [])]
        bad = [o for o in ov if "=" not in o]
        if bad:
            raise FrodCliError(f"compare.methods.{m}: overrides are key=value strings, got {bad[0]!r}")
        # `++`: a method's key may be new to the recipe (e.g. a group_lr entry); dataclass fields stay checked
        ov = [o if o.startswith(("+", "~")) else f"++{o}" for o in ov]
        base = [o for o in ov if o.lstrip("+").split("=", 1)[0] != "optimizer.lr_scale"]
        if stage == "search":
            for x in cc.lr_scales:
                runs.append({"name": f"{m}_lr{_scale_tag(float(x))}", "method": m,
                             "overrides": base + [f"optimizer.lr_scale={float(x)!r}", f"train.seed={int(cc.search_seed)}"]})
        else:
            if best and m in best:
                ov = base + [f"optimizer.lr_scale={float(best[m])!r}"]
            for seed in cc.seeds:
                run = {"name": f"{m}_s{int(seed)}", "method": m, "overrides": ov + [f"train.seed={int(seed)}"]}
                if best and m in best and int(seed) == int(cc.search_seed):
                    run["same_as"] = f"search/{m}_lr{_scale_tag(float(best[m]))}"  # relative to the root
                runs.append(run)
    return runs


def _link_copy(src: Path, dst: Path) -> None:
    """A finished run reused under another stage: hard links (no extra disk), written atomically."""
    import shutil


    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    def write(tmp: str) -> None:
        shutil.copytree(src, tmp, copy_function=link, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)

    atomic_dir(str(dst), write)


def _check_same_settings(run_dir: Path, planned: Sequence[str]) -> None:
    """A finished run is reused only if it was trained with every override planned for it now: a
    changed search winner or recipe must not be answered by a stale run that bears the same name."""
    saved = set(read_overrides(run_dir))
    differ = [o for o in planned if o not in saved]
    if differ:
        raise FrodCliError(f"{run_dir} was trained with other settings (not with {differ[0]}); "
                         f"move it away or use another hydra.run.dir")


def _run_one(run: Dict[str, Any], base_args: List[str], stage_dir: Path, threads: int) -> Dict[str, Any]:
    import subprocess
    import time

    run_dir = stage_dir / run["name"]
    if (run_dir / "metrics.json").exists():  # finished earlier (execute checked its settings): continue
        return {**run, "dir": str(run_dir), "rc": 0, "skipped": True, "seconds": 0.0}
    stage_dir.mkdir(parents=True, exist_ok=True)
    same = run.get("same_as")
    if same and (Path(same) / "metrics.json").exists() and not run_dir.exists():
        _link_copy(Path(same), run_dir)  # the search already ran exactly this (method, rates, seed)
        return {**run, "dir": str(run_dir), "rc": 0, "skipped": True, "seconds": 0.0}
    log_path = stage_dir / f"{run['name']}.log"
    cmd = [sys.executable, "-m", "frod_cli.cli", "train", *base_args, f"method={run['method']}", *run["overrides"],
           "train.progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return {**run, "dir": str(run_dir), "rc": rc, "skipped": False, "seconds": time.perf_counter() - t0,
            "log": str(log_path)}


def execute(runs: List[Dict[str, Any]], base_args: List[str], stage_dir: Path, jobs: int, title: str,
            threads: int = 0) -> List[Dict[str, Any]]:
    """Run `frod train` once per planned run, `jobs` at a time (each in its own process, with the
    machine's threads split between them), with a rich progress bar."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    for r in runs:  # before any training starts, so a refusal never waits on (or orphans) a running job
        if (stage_dir / r["name"] / "metrics.json").exists():
            _check_same_settings(stage_dir / r["name"], [f"method={r['method']}", *base_args, *r["overrides"]])
    jobs = max(1, min(int(jobs), len(runs)))
    threads = int(threads) or max(1, (os.cpu_count() or 1) // jobs)
    done: List[Dict[str, Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(title, total=len(runs))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_run_one, r, base_args, stage_dir, threads) for r in runs]
            for fut in as_completed(futures):
                r = fut.result()
                done.append(r)
                what = ("already done" if r["skipped"] else f"{r['seconds']:.0f} s") if r["rc"] == 0 \
                    else f"FAILED (exit {r['rc']}), log: {r['log']}"
                bar.console.print(f"  {r['name']}: {what}")
                bar.advance(task)
    return sorted(done, key=lambda r: r["name"])


def pick_best(stage_dir: Path, runs: List[Dict[str, Any]], mode: str) -> Dict[str, Any]:
    """Per method, the lr_scale with the best validation objective (the search's only criterion)."""
    table: Dict[str, Dict[float, Optional[float]]] = {}
    for r in runs:
        scale = float(next(o.split("=", 1)[1] for o in r["overrides"] if o.lstrip("+").startswith("optimizer.lr_scale=")))
        value = None
        final = read_metrics(r["dir"]) if r["rc"] == 0 else None
        if final is not None:
            value = final.get("objective_value")
        table.setdefault(r["method"], {})[scale] = None if value is None else float(value)
    best: Dict[str, float] = {}
    for m, by_scale in table.items():
        ok = {x: v for x, v in by_scale.items() if v is not None and math.isfinite(v)}
        if ok:
            best[m] = (max if mode == "max" else min)(ok, key=ok.get)
    return {"best": best, "table": table}


def _search_markdown(found: Dict[str, Any], objective: str) -> str:
    scales = sorted({x for t in found["table"].values() for x in t})
    lines = [f"# Learning-rate search (validation {objective})", "",
             "Each method's configured rates times `optimizer.lr_scale`; one seed; the best is in bold.", "",
             "| method | " + " | ".join(f"x{x:g}" for x in scales) + " | best |", "|---" * (len(scales) + 2) + "|"]
    for m, t in found["table"].items():
        cells = []
        for x in scales:
            v = t.get(x)
            cell = "-" if v is None else f"{v:.4f}"
            cells.append(f"**{cell}**" if found["best"].get(m) == x else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | x{found['best'].get(m, float('nan')):g} |")
    return "\n".join(lines) + "\n"


def run_compare(cfg: Any, root: str, user_overrides: Sequence[str]) -> Dict[str, Any]:
    """The `frod compare` verb: search and/or comparison runs under `root`, then the report."""

    from frod_cli.runs.lock import hold

    hold(root, "comparison directory")  # one frod compare at a time in it (each job also locks its own run)
    cc = cfg.compare
    stage = str(cc.stage)
    if stage not in ("compare", "search", "both"):
        raise FrodCliError(f"compare.stage must be compare, search or both, got {stage!r}")
    if int(cc.jobs) < 1:
        raise FrodCliError(f"compare.jobs must be >= 1, got {cc.jobs}")
    # Every run gets the user's overrides except the comparison's own keys and the method choice.
    base_args = [o for o in user_overrides
                 if not o.lstrip("+~").split("=", 1)[0].startswith(("compare.", "hydra.", "method"))]
    rootp = Path(root)
    out: Dict[str, Any] = {"root": str(rootp)}
    best = None
    if stage in ("search", "both"):
        runs = plan_runs(cc, "search")
        done = execute(runs, base_args, rootp / "search", int(cc.jobs), "learning-rate search", int(cc.threads))
        found = pick_best(rootp / "search", done, str(cfg.task.objective_mode))
        atomic_write_text(str(rootp / "search" / "search.md"), _search_markdown(found, str(cfg.task.objective)))
        atomic_write_json(str(rootp / "search" / "best.json"), found["best"])
        print(_search_markdown(found, str(cfg.task.objective)))
        best = found["best"]
        out["search"] = found
        failed = [r for r in done if r["rc"] != 0]
        if failed and stage == "search":
            raise FrodCliError(f"{len(failed)} of {len(done)} runs failed; logs: {failed[0]['log']}")
    if stage in ("compare", "both"):
        runs = plan_runs(cc, "compare", best)
        for r in runs:
            if "same_as" in r:
                r["same_as"] = str(rootp / r["same_as"])
        done = execute(runs, base_args, rootp / "runs", int(cc.jobs), "comparison runs", int(cc.threads))
        failed = [r for r in done if r["rc"] != 0]
        if len(failed) == len(done):
            raise FrodCliError(f"every run failed; logs: {failed[0]['log']}")
        s = build_report(str(rootp / "runs"), str(rootp / "report"))
        out["report"] = str(rootp / "report" / "report.md")
        print(f"compared {sum(len(g['runs']) for g in s['groups'].values())} runs in {len(s['groups'])} groups: "
              f"{out['report']}")
        if failed:
            raise FrodCliError(f"{len(failed)} of {len(done)} runs failed (the report covers the rest); "
                               f"logs: {', '.join(r['log'] for r in failed)}")
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="frod compare", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a sweep/multirun directory (or any directory of run directories)")
    p.add_argument("--out", default=None, help="output directory (default: <sweep_dir>/compare)")
    p.add_argument("--objective", default=None, help="metric to compare (default: the runs' task.objective)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="training-loss thresholds (default: 0.9/0.75/0.5/0.25 x the initial loss)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window in log points (default 5)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        s = build_report(a.sweep_dir, a.out, a.objective, a.thresholds, a.smooth)
    except (FrodCliError, OSError) as e:
        print(f"frod compare: error: {e}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.sweep_dir, "compare")
    print(f"compared {sum(len(g['runs']) for g in s['groups'].values())} runs in {len(s['groups'])} groups: "
          f"{os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
