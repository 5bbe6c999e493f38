"""`frod cache [list|clear] [base=<name>] [dir=<path>]`: what the FRoD basis cache holds (per base model: its
categories, layers, settings and size) and emptying it, whole or for one base.

The cache (frod_cli/frod/cache.py) keeps each category's decomposition, keyed by the category's weights, so a
second run on the same base skips the HO-GSVD; `frod train` uses it unless method.basis_cache=false. Its
directory: dir=..., else $FROD_BASIS_CACHE, else $FROD_CACHE/basis (frod_cli/paths.py)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from frod_cli import FrodCliError
from frod_cli.commands import Prepared, register_verb

ACTIONS = ("list", "clear")


def prepare(args: Sequence[str]) -> Prepared:
    """`frod cache clear base=x` is `action=clear base=x` to Hydra."""
    args = list(args)
    if args and args[0] in ACTIONS:
        args = [f"action={args[0]}", *args[1:]]
    elif args and "=" not in args[0] and not args[0].startswith("-"):
        raise FrodCliError(f"frod cache {args[0]}: the actions are {' and '.join(ACTIONS)}")
    return args, None


@register_verb("cache", config="cache", prepare=prepare,
               summary="the FRoD basis cache:  frod cache list | frod cache clear [base=<name>]")
def run(cfg: Any) -> Dict[str, Any]:
    from frod_cli.frod.cache import clear_cache, list_entries
    from frod_cli.paths import basis_cache_dir

    if cfg.action not in ACTIONS:
        raise FrodCliError(f"frod cache {cfg.action}: the actions are {' and '.join(ACTIONS)}")
    directory = os.path.abspath(os.path.expanduser(str(cfg.dir))) if cfg.dir else basis_cache_dir()
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FrodCliError(f"the basis cache {directory} is not a directory")
    base = None if cfg.base is None else str(cfg.base)
    if cfg.action == "clear":
        removed, freed = clear_cache(directory, base=base)
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} ({size(freed)}) from {directory}"
              + (f" (base {base})" if base is not None else ""))
        return {"directory": directory, "removed": removed, "bytes": freed}
    entries = [e for e in list_entries(directory) if base is None or e.get("base") == base]
    print("\n".join(describe(directory, entries)))
    return {"directory": directory, "entries": entries}


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(directory: str, entries: List[Dict[str, Any]]) -> List[str]:
    """The listing: a header counting every entry it lists, then per base model (the name the run gave it, and
    its weights' fingerprint) its entries (category, layers, n, settings, where computed), then damaged files."""
    damaged = [e for e in entries if "problem" in e]
    lines = [f"FRoD basis cache {directory}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
             f"{size(sum(int(e['bytes']) for e in entries))}" + (f" ({len(damaged)} damaged)" if damaged else "")]
    by_base: Dict[str, List[Dict[str, Any]]] = {}
    for e in entries:
        if "problem" not in e:
            by_base.setdefault(f"{e.get('base')} (weights {e.get('base_fingerprint')})", []).append(e)
    for name, group in sorted(by_base.items()):
        lines.append(f"base {name}: {len(group)} entr{'y' if len(group) == 1 else 'ies'}, "
                     f"{size(sum(int(e['bytes']) for e in group))}")
        for e in sorted(group, key=lambda e: str(e.get("category"))):
            n = (e.get("shapes") or [[0, 0]])[0][1]
            lines.append(f"  {e.get('category')}  {len(e.get('layers') or [])} layers, n={n}, "
                         f"{e.get('basis_dtype')}, regularization {e.get('regularization')}, "
                         f"{'U stored, ' if e.get('rank_deficient') == 'true' else ''}{size(int(e['bytes']))}; "
                         f"computed on {e.get('computed_on')} in {e.get('compute_s')} s, {e.get('created')}")
    for e in damaged:
        lines.append(f"damaged: {e['file']} ({e['problem']}): a run recomputes it; `frod cache clear` removes it")
    return lines
