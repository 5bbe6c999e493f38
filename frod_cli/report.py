"""The Hydra callback that writes a sweep's summary at the end of `frod train -m` (summary.csv, summary.md,
loss_curves.png: frod_cli.compare.summarize_sweep, which reads and plots runs as the comparison report does)."""
from __future__ import annotations

import logging
from typing import Any

from frod_cli.compare import summarize_sweep

log = logging.getLogger("frod.report")

try:  # the Hydra callback (Hydra is a dependency; keep report importable without it anyway)
    from hydra.experimental.callback import Callback as _Callback
except Exception:  # noqa: BLE001  # pragma: no cover
    _Callback = object


class SweepSummaryCallback(_Callback):
    """Configured in recipes/config.yaml (hydra.callbacks): summarizes a multirun's jobs."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        paths = summarize_sweep(sweep_dir)
        if paths is None:
            log.warning("sweep %s: no finished job (no metrics.json)", sweep_dir)
        else:
            print(f"sweep summary: {paths['md']} ({paths['csv']}, {paths['png']})")


__all__ = ["SweepSummaryCallback", "summarize_sweep"]
