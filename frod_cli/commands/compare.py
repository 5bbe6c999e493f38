"""`frod compare recipe=<name> [compare.stage=search|compare|both]`: every method of a recipe's `compare` block
on the same budget and seeds, then a report (frod_cli/compare.py); `frod compare <sweep dir>`: the report only."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from frod_cli import FrodCliError
from frod_cli.commands import Prepared, register_verb


# frod compare composes frod train's config (recipes/config.yaml): its --help says what compare is
HELP = {
    "app_name": "frod compare",
    "header": "frod compare: every method of the compare block of a recipe on the same budget and seeds (each run a "
              "frod train of its own), then a report; or the report only of a directory of finished runs.",
    "footer": "Examples:\n"
              "  frod compare recipe=compare/text_minilm                      # the methods x seeds, then report/\n"
              "  frod compare recipe=compare/text_minilm compare.stage=search # a learning-rate search per method first\n"
              "  frod compare recipe=compare/text_minilm compare.jobs=2       # two runs at a time\n"
              "  frod compare recipe=compare/text_minilm output_dir=runs/cmp  # its directory (each run in a folder inside)\n"
              "  frod compare multirun/quickstart/<date> [--out DIR]          # the report of any finished sweep\n"
              "The compare.* keys are in the composed config above; every other key is a frod train key.",
}


def help_overrides() -> List[str]:
    return [f"hydra.help.{key}='{text}'" for key, text in HELP.items()]


def prepare(args: Sequence[str]) -> Prepared:
    """`frod compare` runs its own sweep: no -m; its directory defaults to runs/<recipe>/compare_<time>; its
    --help is its own."""
    if any(a in ("-m", "--multirun") for a in args):
        raise FrodCliError("frod compare runs its own sweep: drop -m (methods and seeds come from compare.*)")
    from frod_cli.commands.train import user_data_args

    args = user_data_args(args)
    if any(a in ("--help", "-h") for a in args):
        args = help_overrides() + args
    keys = [a.lstrip("+~").split("=", 1)[0] for a in args]
    if "resume" in keys:
        raise FrodCliError("frod compare takes no resume=: run the same command with the same output_dir= and it "
                           "skips the runs already finished there")
    # output_dir= names the comparison's own directory: each of its runs gets a folder inside it, never that one
    outs = [a.split("=", 1)[1] for a, key in zip(args, keys) if key == "output_dir"]
    args = [a for a, key in zip(args, keys) if key != "output_dir"]
    if outs and "hydra.run.dir" in keys:
        raise FrodCliError("frod compare: give its directory once, as output_dir= or hydra.run.dir=, not both")
    if outs:
        args.insert(0, f"hydra.run.dir={outs[-1]}")
    elif "hydra.run.dir" not in keys:
        args.insert(0, "hydra.run.dir=${frod_dir:runs}/${recipe_name}/compare_${now:%Y-%m-%d_%H-%M-%S}")
    return args, None


def check(composed: Any, args: Sequence[str]) -> List[str]:
    """Before Hydra creates anything: a directory holding a finished `frod train` run is that run's, not a
    comparison's (its runs and report would be written into it)."""
    from frod_cli.runs import directory as rd

    root = str(composed.hydra.run.dir)
    if rd.state_of(root) == rd.FINISHED:
        raise FrodCliError(f"{root} holds a finished frod train run (metrics.json): a comparison writes its runs and "
                           "report into a directory of its own; pick another output_dir")
    return list(args)


def direct(args: Sequence[str]) -> Optional[int]:
    """A directory of finished runs as the first argument: write its report, no training."""
    if args and "=" not in args[0] and not args[0].startswith("-"):
        from frod_cli.compare import main as report_main

        return report_main(list(args))
    return None


@register_verb("compare", config="config", prepare=prepare, check=check, direct=direct,
               summary="every method of a recipe's compare block, then a report; or `frod compare <sweep dir>`")
def run(cfg: Any) -> Dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from frod_cli.compare import run_compare

    hc = HydraConfig.get()
    return run_compare(cfg, hc.runtime.output_dir, list(hc.overrides.task))
