"""The verbs of `frod`: one module each in this package, thin over the library, registered with
`register_verb`. Each is a Hydra application over one YAML of the packaged recipes/ tree (`config`), so a verb is
one file here plus its YAML; frod_cli/cli.py runs them (argv, Hydra, the one-line errors).

A verb module defines `run(cfg)` (the Hydra task function) and may give:
  prepare(args) -> (args, cleanup)   rewrites the command line before Hydra sees it (train: resume=, ranks)
  direct(args) -> exit code | None   handles a command line without Hydra (compare <dir>: a report only)
  check(composed, args) -> args      checks on the composed config (Hydra's part included) before Hydra creates
                                     any directory (train: its output directory is writable; a sweep's is locked)
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Prepared = Tuple[List[str], Optional[Callable[[], None]]]


@dataclass(frozen=True)
class Verb:
    name: str
    config: str  # recipes/<config>.yaml
    run: Callable[[Any], Any]
    summary: str  # one line for `frod --help`
    prepare: Optional[Callable[[Sequence[str]], Prepared]] = None
    direct: Optional[Callable[[Sequence[str]], Optional[int]]] = None
    check: Optional[Callable[[Any, Sequence[str]], List[str]]] = None


VERBS: Dict[str, Verb] = {}
_DISCOVERED = False


def register_verb(name: str, *, config: str, summary: str, prepare: Optional[Callable] = None,
                  direct: Optional[Callable] = None, check: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """Decorates a verb's `run(cfg)`."""

    def deco(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if name in VERBS and VERBS[name].run is not run:
            raise ValueError(f"verb {name!r} registered twice")
        VERBS[name] = Verb(name, config, run, summary, prepare, direct, check)
        return run

    return deco


def discover() -> Dict[str, Verb]:
    """Import every verb module (registration happens on import); the registry, in name order."""
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _DISCOVERED = True
    return dict(sorted(VERBS.items()))


__all__ = ["Verb", "VERBS", "Prepared", "discover", "register_verb"]
