"""What a person sees: console logging, the rich progress bar of a run and its closing summary (main process
only). Logging and the bar share one rich Console, so in a terminal a log line is printed above the bar, never
on the bar's line; outside a terminal log lines are plain and whole."""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
PLAIN_WIDTH = 200  # columns of a rendered line (the progress bar) when stdout is not a terminal
_CONSOLE = None


def console() -> Any:
    """The one rich Console of this process (stdout, looked up at each write: pytest and redirections work)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(soft_wrap=True)  # long lines stay whole (the terminal, or the file, wraps them)
        if not _CONSOLE.is_terminal:  # a log file: the progress bar's last line whole, not cut to 80 columns
            _CONSOLE = Console(soft_wrap=True, width=PLAIN_WIDTH)
    return _CONSOLE


class _StdoutHandler(logging.StreamHandler):
    """Plain log lines to whatever sys.stdout is at the time of the record."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D401 - logging's attribute
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_handler() -> logging.Handler:
    """The console handler of the logging config (recipes/hydra/job_logging/frod.yaml)."""
    if console().is_terminal:
        from rich.logging import RichHandler

        return RichHandler(console=console(), show_path=False, markup=False, rich_tracebacks=False)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


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
        transient=False, console=console(),
    )


def print_final(final: Dict[str, Any], output_dir: str) -> None:
    c = console()
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


class TrainingProgress:
    """The training loop's progress bar (train.progress, main process): steps, loss, learning rate, throughput.
    Every call is a no-op when it is off."""

    def __init__(self, enabled: bool, title: str, total: int, completed: int):
        self.bar = progress_bar(enabled)
        if self.bar is not None:
            self.task = self.bar.add_task(title, total=total, completed=completed, loss="-", lr="-", sps="-")
            self.bar.start()

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def show(self, record: Dict[str, Any]) -> None:
        """A metrics.jsonl training line's loss, first learning rate and samples/s."""
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.0f}",
                            lr=f"{next(iter(record['lr'].values())):.2e}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
