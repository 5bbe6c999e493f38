"""Method registry: name -> a `Method` and its config dataclass (see base.py). Every module of this
package is imported on first use, so adding a method is one file here plus one YAML in recipes/method/."""
from __future__ import annotations

from frod_cli import import_submodules
from frod_cli.methods.base import (CONFIGS, METHODS, Method, MethodConfig, build_method, get_method, method_config,
                                   register_method)

_DISCOVERED = False


def discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import_submodules(__name__, __path__)
    _DISCOVERED = True


def available() -> list:
    discover()
    return sorted(METHODS)


__all__ = ["CONFIGS", "METHODS", "Method", "MethodConfig", "available", "build_method", "discover", "get_method",
           "method_config", "register_method"]
