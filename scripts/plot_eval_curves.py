"""Validation-metric curves of a comparison: one line per method, the mean over its seeds (± std shaded) of a
metric at every evaluation step, read from each run's metrics.jsonl.

    python scripts/plot_eval_curves.py runs/compare_dpo_smollm2/compare_<time>/runs reward_accuracy out.png
    python scripts/plot_eval_curves.py runs/grpo_cmp/runs train:reward/mean sampled_reward.png   # training rows

`frod compare` plots the training loss of each method (report/loss_curves.png); this adds a validation metric
over the steps, e.g. the reward accuracy of a preference comparison (docs/RESULTS.md section 6); a metric
written `train:<key>` is read from the training steps' rows instead, e.g. GRPO's sampled reward (section 7).
"""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

from frod_cli.runs import RunPaths, find_runs, loss_series, read_jsonl, read_run, training_rows
from frod_cli.runs.plots import pyplot, save_fig


def curves(root: str, metric: str) -> Dict[str, List[List[Tuple[int, float]]]]:
    """method -> one [(step, value)] list per run: of the validation evaluations, or of the training steps for a
    metric written `train:<key>`."""
    out: Dict[str, List[List[Tuple[int, float]]]] = defaultdict(list)
    train, key = metric.startswith("train:"), metric.removeprefix("train:")
    for d in find_runs(root):
        log = RunPaths.of(d).log
        rows = training_rows(read_jsonl(str(log))) if train else loss_series(log)[1]
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) is not None]
        if points:
            out[read_run(d)["method"]].append(points)
    return out


def plot(groups: Dict[str, List[List[Tuple[int, float]]]], metric: str, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, runs in sorted(groups.items()):
        steps = sorted(set.intersection(*(set(s for s, _ in r) for r in runs)))
        ys = np.array([[dict(r)[s] for s in steps] for r in runs])
        mean, std = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(steps))
        (line,) = ax.plot(steps, mean, marker="o", label=f"{method} (n={len(runs)})")
        if len(ys) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    what = f"training steps' {metric.removeprefix('train:')}" if metric.startswith("train:") else f"validation {metric}"
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{what} (mean ± std over seeds)")
    save_fig(fig, path)
    plt.close(fig)


def main(argv: List[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    root, metric, path = argv
    groups = curves(root, metric)
    if not groups:
        print(f"no run under {root} logged {metric}", file=sys.stderr)
        return 2
    plot(groups, metric, path)
    print(f"wrote {path} ({', '.join(f'{m}: {len(r)} runs' for m, r in sorted(groups.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
