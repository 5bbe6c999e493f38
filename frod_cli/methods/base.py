"""The method protocol: how a fine-tuning method adapts a model, which parameters it trains (in named
groups, for per-group learning rates), how it saves, reloads and merges, and what it wraps around an
accumulation window.

A method is one file in this package: a config dataclass (a subclass of `MethodConfig`, its keys are the
`method.*` keys a recipe may set) and a `Method` subclass, registered together with
`@register_method("name", config=TheConfig)`; plus `recipes/method/<name>.yaml`. The configs are stored in
Hydra's ConfigStore (group `method`, name `<name>_schema`), so `method=lora method.sparse_rate=0.5` is
refused before any work. The training loop only talks to this interface.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING
from torch import nn

from frod_cli import FrodCliError
from frod_cli.frod.targets import describe_linear_roles, find_linear_targets, inside

METHODS: Dict[str, type] = {}
CONFIGS: Dict[str, type] = {}


@dataclass
class MethodConfig:
    """The keys every method has."""

    name: str = MISSING  # the registry key: frod | full | lora | dora | pissa | vera | peft_frod
    # PEFT's rule (frod_cli.frod.targets): a list of module-path suffixes, or one regex string.
    # None: the model family's default (model.target_modules).
    target_modules: Any = None
    modules_to_save: List[str] = field(default_factory=list)  # task head etc.; empty = the task's default
    layers_to_transform: Optional[List[int]] = None  # block indices (the first integer of a module path)


def register_method(name: str, config: type = MethodConfig) -> Callable[[type], type]:
    """Register a Method subclass under `name` with its config dataclass (a MethodConfig subclass)."""
    if not issubclass(config, MethodConfig):
        raise TypeError(f"method {name!r}: its config must subclass MethodConfig")

    def deco(cls: type) -> type:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        cls.config_class = config
        METHODS[name] = cls
        CONFIGS[name] = config
        return cls

    return deco


class Method:
    """Base class. Subclasses implement `adapt`, `param_groups`, `save_adapter`, `load_adapter`, `merge`.
    `cfg` is the method's config, `task` a `frod_cli.tasks.base.Task` (or None), `model_cfg` the
    `ModelConfig` (it supplies the model family's default target modules)."""

    name: str = ""
    config_class: type = MethodConfig
    # True where merging changes nothing (full fine-tuning): no difference to report.
    trains_everything: bool = False
    # Why this method cannot train on a 4-bit base (model.quantization=nf4|fp4), refused before any work; None: it can.
    refuse_quantized: Optional[str] = None
    # What `adapt` computes from the base weights themselves, so that a process starting from the meta device
    # (train.fsdp.load_on_rank0) cannot adapt: every process then loads the base. None: it adapts without them
    # (its values then come from rank 0; FRoD's bases are built on the ranks holding the weights).
    needs_base_weights: Optional[str] = None
    # Libraries the method builds its adapter with, imported with the others before a run's clock starts (PEFT,
    # with bitsandbytes behind it, costs a process about 2 s: only the methods that use it pay it)
    libraries: Tuple[str, ...] = ()

    def __init__(self, cfg: Any, task: Any = None, model_cfg: Any = None):
        self.cfg = cfg
        self.task = task
        self.model_cfg = model_cfg
        self.base_param_count: Optional[int] = None
        # Where one-time setup math may run (FRoD's bases): the run's accelerator, set by the recipe before
        # `adapt`; None: where the model's weights are.
        self.device: Any = None

    # ---- what to adapt -------------------------------------------------------------------
    def modules_to_save(self) -> List[str]:
        mts = list(self.cfg.modules_to_save or [])
        if not mts and self.task is not None:
            mts = list(getattr(self.task, "default_modules_to_save", ()) or ())
        return mts

    def target_spec(self) -> Any:
        """method.target_modules, else the model family's: a list of suffixes, a regex string, or None."""
        tm = self.cfg.target_modules
        if tm is None and self.model_cfg is not None:
            tm = getattr(self.model_cfg, "target_modules", None)
        if tm is None or isinstance(tm, str):
            return tm
        return [str(t) for t in tm]

    def resolve_targets(self, model: nn.Module) -> List[str]:
        """Full paths of the linear layers to adapt, outside the task head, in `layers_to_transform`."""
        spec, heads = self.target_spec(), self.modules_to_save()
        names = [n for n, _ in find_linear_targets(model, spec, exclude=heads,
                                                   layers_to_transform=self.cfg.layers_to_transform)]
        if not names:
            raise FrodCliError(f"method {self.name}: no linear layer matches target_modules={spec!r} (outside "
                               f"{heads}); linear layers here: {describe_linear_roles(model)}")
        return names

    @staticmethod
    def paths_regex(paths: Sequence[str]) -> str:
        """The resolved paths as one regex: handed to the core or to PEFT, it selects exactly them."""
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

    def accumulation(self, model: nn.Module, micro_batches: int) -> ContextManager:
        """A context the loop opens around one accumulation window of `micro_batches` micro-batches.
        Default: nothing."""
        return contextlib.nullcontext()

    def evaluation_context(self, model: nn.Module) -> ContextManager:
        """A context opened around one evaluation or generation (the loop's, `frod eval`, `frod generate`): what
        the adapter may keep for the calls inside it, freed at its end. Default: nothing."""
        return contextlib.nullcontext()

    @classmethod
    def check_sharding(cls, cfg: Any) -> None:
        """Under train.fsdp, before any work: refuse (one line) or settle the method's keys that sharding rules out.
        Default: nothing."""

    def before_sharding(self, model: nn.Module) -> None:
        """Called on the adapted model before FSDP shards it (train.fsdp): what the method must change so that
        nothing it keeps holds a whole sharded weight. Default: nothing."""

    def save_gathered(self, state: Dict[str, Any], directory: str) -> None:
        """Save an adapter from `state`, the model's whole state dict gathered from its shards (a method whose
        trainables FSDP shards: method=full). Other methods save from the model (`save_adapter`)."""
        raise FrodCliError(f"method {self.name} saves its adapter from the model, not from gathered shards")

    def reference_context(self, model: nn.Module) -> ContextManager:
        """A context inside which `model` computes what the starting model computed (the policy before its first
        optimizer step: the reference of a KL penalty, GRPO's task.beta > 0) without a second model in memory,
        e.g. with the adapter switched off. Called on the unwrapped model, around calls without gradients.
        Default: refused (`reference_refusal`)."""
        raise FrodCliError(self.reference_refusal() or f"method {self.name} has no reference context")

    def reference_refusal(self) -> Optional[str]:
        """Why this method, as configured, cannot give the starting model inside the trained one (refused before
        any work when a run needs it); None: `reference_context` gives it."""
        if type(self).reference_context is Method.reference_context:
            return (f"method {self.name} cannot switch back to the starting model, so a KL penalty against it "
                    f"(task.beta > 0) cannot be computed; use task.beta=0")
        return None

    def merge_into(self, model: nn.Module, base_model: nn.Module) -> nn.Module:
        """The trained update of `model` folded into `base_model`, another copy of its base (the unquantized
        original of a 4-bit base: `frod merge base=`); returns the plain merged model."""
        raise FrodCliError(f"method {self.name} has no update to fold into another base")

    def describe(self) -> Dict[str, Any]:
        """What the run's metrics.json records about the method beyond its config (e.g. choices made)."""
        return {}

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


def method_config(name: str, **values: Any) -> Any:
    """The typed config of method `name` (an OmegaConf node), with `values` set: for code and tests."""
    from omegaconf import OmegaConf

    cls = get_method(name).config_class
    return OmegaConf.structured(cls(name=name, **values))


def split_head(model: nn.Module, heads: Sequence[str]):
    """(head params, other trainable params) by module path."""
    head, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (head if inside(n.rsplit(".", 1)[0], heads) else rest).append(p)
    return head, rest
