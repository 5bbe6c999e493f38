"""What a person sees: the rich progress bar of a run and its closing summary (main process only)."""
from __future__ import annotations

from typing import Any, Dict, Optional


def fmt_metrics(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def progress_bar(enabled: bool) -> Optional[Any]:
    """A rich Progress with loss, learning rate and throughput fields, or None."""
    if not enabled:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[sps]} samples/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        transient=False,
    )


def print_final(final: Dict[str, Any], output_dir: str) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]run[/bold] {output_dir}")
    for split in ("validation", "test"):
        if split in final:
            c.print(f"  {split:<10} {fmt_metrics(final[split])}")
    if final.get("test_majority_class_accuracy") is not None:
        c.print(f"  majority-class accuracy (test): {final['test_majority_class_accuracy']:.4f}")
    value = final["objective_value"]
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    c.print(f"  best {final['objective']} {shown} at step {final['best_step']}; trainable "
            f"{final['trainable_params']:,} ({final['trainable_percent']:.3f}%); {final['wall_time_s']:.0f}s")
