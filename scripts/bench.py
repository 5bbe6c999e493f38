#!/usr/bin/env python
"""The benchmarks' entry point (docs/PERFORMANCE.md, scripts/gpu_check.sh): the train step by default, --build
(the FRoD basis build), --quantized memory|generation (4-bit bases). The code is the package frod_cli.bench;
`python scripts/bench.py --help` lists every flag.

    python scripts/bench.py --preset bert768
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a checkout that is not installed
    sys.path.insert(0, str(REPO))

from frod_cli.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
