"""The sweep summary (CSV, Markdown, one plot of every job's loss curve) written by a Hydra callback at
the end of `frod train -m`. Run directories are read through frod_cli.runs."""
from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any, Dict, List, Optional

from frod_cli.runs import atomic_write_text, find_runs, loss_series, read_metrics, read_overrides
from frod_cli.runs.plots import pyplot, save_fig

log = logging.getLogger("frod.report")


# ---------------------------------------------------------------------------------------------
# Sweep summary
# ---------------------------------------------------------------------------------------------
def summarize_sweep(sweep_dir: str) -> Optional[Dict[str, str]]:
    """Write summary.csv, summary.md and loss_curves.png in `sweep_dir` from its jobs' run
    directories. Returns the paths written, or None when no job finished."""
    jobs = find_runs(sweep_dir)
    if not jobs:
        log.warning("sweep %s: no finished job (no metrics.json)", sweep_dir)
        return None
    rows = []
    metric_cols: List[str] = []
    job_overrides = [read_overrides(d) for d in jobs]
    # Overrides shared by every job are the sweep's fixed settings: show what varies.
    common = set.intersection(*(set(o) for o in job_overrides)) if len(jobs) > 1 else set()
    for d, ov in zip(jobs, job_overrides):
        m = read_metrics(d) or {}
        shown = " ".join(o for o in ov if o not in common)
        row = {"job": os.path.relpath(d, sweep_dir), "overrides": shown, "method": m.get("method")}
        for split in ("validation", "test"):
            for k, v in (m.get(split) or {}).items():
                col = f"{split}_{k}"
                row[col] = v
                if col not in metric_cols:
                    metric_cols.append(col)
        row["trainable_params"] = m.get("trainable_params")
        row["trainable_percent"] = m.get("trainable_percent")
        row["steps"] = m.get("steps")
        row["wall_time_s"] = m.get("wall_time_s")
        rows.append(row)
    cols = ["job", "overrides", "method", *metric_cols, "trainable_params", "trainable_percent", "steps", "wall_time_s"]

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    csv_path = os.path.join(sweep_dir, "summary.csv")
    atomic_write_text(csv_path, buf.getvalue())

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    md_path = os.path.join(sweep_dir, "summary.md")
    atomic_write_text(md_path, f"# Sweep summary: {sweep_dir}\n\n" + "\n".join(md) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d, r in zip(jobs, rows):
        train, _ = loss_series(str(d / "metrics.jsonl"))
        if train:
            label = f"{r['job']}: {r['overrides'] or r['method']}"
            label = label if len(label) <= 90 else label[:87] + "..."
            ax.plot([s for s, _ in train], [l for _, l in train], label=label, marker="o" if len(train) < 20 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
    ax.set_title(f"{len(rows)} jobs")
    png_path = os.path.join(sweep_dir, "loss_curves.png")
    save_fig(fig, png_path)
    plt.close(fig)
    return {"csv": csv_path, "md": md_path, "png": png_path}


try:  # the Hydra callback (Hydra is a dependency; keep report importable without it anyway)
    from hydra.experimental.callback import Callback as _Callback
except Exception:  # noqa: BLE001  # pragma: no cover
    _Callback = object


class SweepSummaryCallback(_Callback):
    """Configured in recipes/config.yaml (hydra.callbacks): summarizes a multirun's jobs."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        paths = summarize_sweep(sweep_dir)
        if paths:
            print(f"sweep summary: {paths['md']} ({paths['csv']}, {paths['png']})")
