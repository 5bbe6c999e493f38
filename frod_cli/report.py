"""Run artifacts and reports: atomic writes, the loss curve, and the sweep summary (CSV, Markdown,
one plot of every job's loss curve) written by a Hydra callback at the end of `frod train -m`."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .frod.atomic import _chmod_tree, atomic_dir, recover_atomic_dir  # noqa: F401  (re-exported)

log = logging.getLogger("frod.report")


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _clean(o: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _chmod_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")


class JsonlWriter:
    """Appends one JSON object per line, flushed at once (a log: readable while training)."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self.f.write(json.dumps(_clean(record), default=_json_default) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def loss_series(jsonl_path: str):
    rows = read_jsonl(jsonl_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("loss") is not None and "split" not in r]
    val = [r for r in rows if r.get("split") == "validation"]
    return train, val


def plot_loss_curve(jsonl_path: str, png_path: str, title: str = "", objective: Optional[str] = None) -> None:
    plt = _plt()
    train, val = loss_series(jsonl_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [l for _, l in train], label="training loss", color="tab:blue",
                marker="o" if len(train) < 20 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if val:
        keys = [k for k in val[0] if k not in ("step", "split", "best") and isinstance(val[0][k], (int, float))]
        key = objective if objective in keys else (keys[0] if keys else None)
        if key:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in val], [r.get(key) for r in val], "o--", color="tab:orange",
                     label=f"validation {key}")
            ax2.set_ylabel(f"validation {key}")
            ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    _save_fig(fig, png_path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Sweep summary
# ---------------------------------------------------------------------------------------------
def _job_dirs(sweep_dir: str) -> List[Path]:
    root = Path(sweep_dir)
    dirs = [p.parent for p in root.rglob("metrics.json") if "merged" not in p.parts and "adapter" not in p.parts]
    return sorted(set(dirs), key=lambda p: (len(p.parts), [int(x) if x.isdigit() else x for x in p.parts]))


def _overrides(job_dir: Path) -> List[str]:
    f = job_dir / ".hydra" / "overrides.yaml"
    if not f.exists():
        return []
    try:
        from omegaconf import OmegaConf

        ov = OmegaConf.to_container(OmegaConf.load(f))
        return [str(o) for o in ov if not str(o).startswith("hydra.")]
    except Exception:  # noqa: BLE001
        return []


def summarize_sweep(sweep_dir: str) -> Optional[Dict[str, str]]:
    """Write summary.csv, summary.md and loss_curves.png in `sweep_dir` from its jobs' run
    directories. Returns the paths written, or None when no job finished."""
    jobs = _job_dirs(sweep_dir)
    if not jobs:
        log.warning("sweep %s: no finished job (no metrics.json)", sweep_dir)
        return None
    rows = []
    metric_cols: List[str] = []
    job_overrides = [_overrides(d) for d in jobs]
    # Overrides shared by every job are the sweep's fixed settings: show what varies.
    common = set.intersection(*(set(o) for o in job_overrides)) if len(jobs) > 1 else set()
    for d, ov in zip(jobs, job_overrides):
        with open(d / "metrics.json", encoding="utf-8") as f:
            m = json.load(f)
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

    plt = _plt()
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
    _save_fig(fig, png_path)
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
