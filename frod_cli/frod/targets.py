"""The one target matcher (PEFT's rule), used by the FRoD core and by every method of the CLI.

`target_modules` is either
  - a list of names: each is a suffix of module paths on dot boundaries, so "query" matches
    "encoder.layer.3.attention.self.query" and "attention.output.dense" matches exactly the attention
    output projections (not "intermediate.dense" or "output.dense" of the feed-forward block); or
  - a single string: a regular expression matched against the whole module path (re.fullmatch).
A one-element list is always a list of suffixes, whatever characters it holds.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

TargetSpec = Union[str, Sequence[str]]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's transformers Conv1D (weight stored fan_in x fan_out)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def matches(name: str, target_modules: TargetSpec) -> bool:
    """True when module path `name` is selected by `target_modules` (see the module docstring)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == p or name.endswith("." + p) for p in target_modules)


def inside(name: str, modules: Sequence[str]) -> bool:
    """True when `name` is one of `modules` (suffix rule) or lies inside one: used for task heads, whose
    own linear layers are trained in full and never adapted."""
    parts = name.split(".")
    return any(matches(".".join(parts[: i + 1]), list(modules)) for i in range(len(parts))) if modules else False


def block_index(name: str) -> Optional[int]:
    """The first integer in a module path (the transformer block), or None."""
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def role_of(name: str) -> str:
    """The module path with block indices removed: `encoder.layer.3.attention.self.query` ->
    `encoder.layer.*.attention.self.query`. Text and vision towers keep distinct roles."""
    return ".".join("*" if p.isdigit() else p for p in name.split("."))


def find_linear_targets(model: nn.Module, target_modules: Optional[TargetSpec], exclude: Sequence[str] = (),
                        layers_to_transform: Optional[Iterable[int]] = None,
                        skip: Tuple[type, ...] = ()) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every linear layer selected by `target_modules` (None: every linear layer),
    outside the modules in `exclude`, in blocks `layers_to_transform` when given. May be empty."""
    keep = None if layers_to_transform is None else {int(i) for i in layers_to_transform}
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear(module) or isinstance(module, skip) or inside(name, exclude):
            continue
        if target_modules is not None and not matches(name, target_modules):
            continue
        if keep is not None and block_index(name) not in keep:
            continue
        found.append((name, module))
    return found


def describe_linear_roles(model: nn.Module, limit: int = 40) -> str:
    """The roles of the model's linear layers, for a refusal that names what could have matched."""
    roles = sorted({role_of(n) for n, m in model.named_modules() if n and is_linear(m)})
    return ", ".join(roles[:limit]) + (" ..." if len(roles) > limit else "")
