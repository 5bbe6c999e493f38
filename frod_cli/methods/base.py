"""The method protocol: how a fine-tuning method adapts a model, which parameters it trains
(in named groups, for per-group learning rates), how it saves, reloads and merges.

The training loop only talks to this interface; it knows nothing about FRoD or PEFT.
A method is one file in this package (registered with `@register_method("name")`) plus one YAML
in `recipes/method/`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from frod_cli import FrodCliError

METHODS: Dict[str, type] = {}

_REGEX_CHARS = set(".*+?[](){}|^$\\")


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers GPT-2 Conv1D


def _under(name: str, prefixes: Sequence[str]) -> bool:
    """True if module path `name` is (inside) a module whose path ends with one of `prefixes`."""
    parts = name.split(".")
    for p in prefixes:
        pp = p.split(".")
        for i in range(len(parts) - len(pp) + 1):
            if parts[i : i + len(pp)] == pp:
                return True
    return False


def first_index(name: str) -> Optional[int]:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


class Method:
    """Base class. Subclasses implement `adapt`, `param_groups`, `save_adapter`, `load_adapter`,
    `merge`. `cfg` is a `MethodConfig`, `task` a `frod_cli.tasks.base.Task` (or None),
    `model_cfg` the `ModelConfig` (supplies the model family's default target modules)."""

    name: str = ""
    # True where merging changes nothing (full fine-tuning): no difference to report.
    trains_everything: bool = False

    def __init__(self, cfg: Any, task: Any = None, model_cfg: Any = None):
        self.cfg = cfg
        self.task = task
        self.model_cfg = model_cfg
        self.base_param_count: Optional[int] = None

    # ---- what to adapt -------------------------------------------------------------------
    def modules_to_save(self) -> List[str]:
        mts = list(self.cfg.modules_to_save or [])
        if not mts and self.task is not None:
            mts = list(getattr(self.task, "default_modules_to_save", ()) or ())
        return mts

    def target_patterns(self) -> Optional[List[str]]:
        tm = self.cfg.target_modules
        if tm is None and self.model_cfg is not None:
            tm = getattr(self.model_cfg, "target_modules", None)
        return list(tm) if tm is not None else None

    def resolve_targets(self, model: nn.Module) -> List[str]:
        """Full paths of the linear layers to adapt: matches of the target patterns (suffixes, or a
        single regex) outside the task head, restricted to `layers_to_transform`."""
        patterns = self.target_patterns()
        heads = self.modules_to_save()
        regex = None
        if patterns is not None and len(patterns) == 1 and set(patterns[0]) & _REGEX_CHARS:
            regex = re.compile(patterns[0])
        names = []
        for name, module in model.named_modules():
            if not name or not _is_linear(module) or _under(name, heads):
                continue
            if regex is not None:
                ok = regex.fullmatch(name) is not None
            elif patterns is None:
                ok = True
            else:
                ok = any(name == p or name.endswith("." + p) for p in patterns)
            if ok and self.cfg.layers_to_transform is not None:
                ok = first_index(name) in set(self.cfg.layers_to_transform)
            if ok:
                names.append(name)
        if not names:
            raise FrodCliError(
                f"method {self.name}: no linear layer matches target_modules={patterns} "
                f"(outside {heads}); set model.target_modules or method.target_modules"
            )
        return names

    @staticmethod
    def paths_regex(paths: Sequence[str]) -> str:
        return "(?:" + "|".join(re.escape(p) for p in paths) + ")"

    # ---- the protocol --------------------------------------------------------------------
    def adapt(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> Dict[str, List[nn.Parameter]]:
        """Named groups of trainable parameters (group names key `optimizer.group_lr`)."""
        raise NotImplementedError

    def save_adapter(self, model: nn.Module, directory: str) -> None:
        raise NotImplementedError

    def load_adapter(self, base_model: nn.Module, directory: str) -> nn.Module:
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """The plain transformers model (original architecture) with the adaptation merged in."""
        raise NotImplementedError

    # ---- shared helpers ------------------------------------------------------------------
    def count_base(self, model: nn.Module) -> None:
        self.base_param_count = sum(p.numel() for p in model.parameters())

    def trainable_summary(self, model: nn.Module) -> Dict[str, float]:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = self.base_param_count or sum(p.numel() for p in model.parameters())
        return {
            "trainable_params": int(trainable),
            "total_params": int(total),
            "trainable_percent": 100.0 * trainable / max(total, 1),
        }


def get_method(name: str) -> type:
    from frod_cli.methods import discover

    discover()
    if name not in METHODS:
        raise FrodCliError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: Any, task: Any = None, model_cfg: Any = None) -> Method:
    return get_method(cfg.name)(cfg, task, model_cfg)


def split_head(model: nn.Module, heads: Sequence[str], is_head: Optional[Callable[[str], bool]] = None):
    """(head params, other trainable params) by module path."""
    head, rest = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        h = is_head(n) if is_head is not None else _under(n.rsplit(".", 1)[0], heads)
        (head if h else rest).append(p)
    return head, rest
