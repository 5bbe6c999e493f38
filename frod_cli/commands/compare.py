"""`frod compare recipe=<name> [compare.stage=search|compare|both]`: every method of a recipe's `compare` block
on the same budget and seeds, then a report (frod_cli/compare.py); `frod compare <sweep dir>`: the report only."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from frod_cli import FrodCliError
from frod_cli.commands import Prepared, register_verb


def prepare(args: Sequence[str]) -> Prepared:
    """`frod compare` runs its own sweep: no -m; its directory defaults to runs/<recipe>/compare_<time>."""
    if any(a in ("-m", "--multirun") for a in args):
        raise FrodCliError("frod compare runs its own sweep: drop -m (methods and seeds come from compare.*)")
    from frod_cli.commands.train import user_data_args

    args = user_data_args(args)
    if not any(a.split("=", 1)[0] == "hydra.run.dir" for a in args):
        args.insert(0, "hydra.run.dir=${frod_dir:runs}/${recipe_name}/compare_${now:%Y-%m-%d_%H-%M-%S}")
    return args, None


def direct(args: Sequence[str]) -> Optional[int]:
    """A directory of finished runs as the first argument: write its report, no training."""
    if args and "=" not in args[0] and not args[0].startswith("-"):
        from frod_cli.compare import main as report_main

        return report_main(list(args))
    return None


@register_verb("compare", config="config", prepare=prepare, direct=direct,
               summary="every method of a recipe's compare block, then a report; or `frod compare <sweep dir>`")
def run(cfg: Any) -> Dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from frod_cli.compare import run_compare

    hc = HydraConfig.get()
    return run_compare(cfg, hc.runtime.output_dir, list(hc.overrides.task))
