"""`python -m frod_cli.bench ...`: the same command as scripts/bench.py (torchrun starts the --build workers so)."""
import sys

from frod_cli.bench.cli import main

sys.exit(main())
