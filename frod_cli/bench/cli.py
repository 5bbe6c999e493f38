"""The benchmarks' command line (scripts/bench.py, `python -m frod_cli.bench`): one parser holding every
benchmark's flags; the first benchmark whose flag is given runs (--quantized, --build --build-mode/--build-precision,
--build, --fsdp, --fsdp-step), else the train step."""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from frod_cli.bench.common import make_log, offline_environment
from frod_cli.memory import frozen_heap


def benchmarks() -> List:
    """The benchmark modules, the one chosen first where several could run; the last (train step) is the default.
    Each has add_args(parser), selected(args) -> bool and run(args, log) -> exit status."""
    from frod_cli.bench import basis_build, basis_stream, fsdp, fsdp_step, quantized, rollout, train_step

    return [quantized, rollout, basis_stream, basis_build, fsdp, fsdp_step, train_step]


def parser() -> argparse.ArgumentParser:
    from frod_cli.bench import train_step

    ap = argparse.ArgumentParser(prog="bench.py", description=train_step.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for bench in reversed(benchmarks()):  # the train step's flags first, as --help has always listed them
        bench.add_args(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging

    offline_environment()
    from frod_cli.cli import QUIET_LOGGERS

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = parser().parse_args(argv)
    log = make_log(args.quiet)
    *chosen, default = benchmarks()
    bench = next((b for b in chosen if b.selected(args)), default)
    with frozen_heap():
        return bench.run(args, log)
