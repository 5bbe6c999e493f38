"""Plots of run directories (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import io
from typing import Optional

from frod_cli.runs.io import atomic_write_bytes
from frod_cli.runs.reader import loss_series


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_loss_curve(jsonl_path: str, png_path: str, title: str = "", objective: Optional[str] = None) -> None:
    plt = pyplot()
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
    save_fig(fig, png_path)
    plt.close(fig)
