"""Method registry: name -> a `Method` (see base.py). Every module of this package is imported on
first use, so adding a method is one file here plus one YAML in recipes/method/."""
from __future__ import annotations

import importlib
import pkgutil

from frod_cli.methods.base import METHODS, Method, build_method, get_method, register_method

_DISCOVERED = False


def discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _DISCOVERED = True


def available() -> list:
    discover()
    return sorted(METHODS)


__all__ = ["METHODS", "Method", "available", "build_method", "discover", "get_method", "register_method"]
