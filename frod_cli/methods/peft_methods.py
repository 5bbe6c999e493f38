"""LoRA-family baselines through PEFT: `lora`, `dora`, `pissa`, `vera`, and `peft_frod` (upstream
PEFT's FRoD, a reference). The task head is passed as `modules_to_save`.
On a 4-bit base (model.quantization=nf4|fp4) lora is QLoRA, and dora and vera train the same way (PEFT wraps the
Linear4bit layers); pissa and peft_frod are refused there. merged/ then comes from the dequantized base.
Groups: adapter (lora_A/B, magnitudes, VeRA vectors), head; peft_frod: sparse, scale, head."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from frod_cli import FrodCliError
from frod_cli.methods.base import Method, MethodConfig, register_method
from frod_cli.methods.frod import FrodKeys, check_frod_keys


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0


@dataclass
class VeraMethodConfig(MethodConfig):
    r: int = 256  # VeRA's shared random matrices are wide: its usual rank is far above LoRA's
    dropout: float = 0.0
    projection_seed: int = 0  # PRNG key of the shared random projections


class PeftMethod(Method):
    libraries = ("peft",)

    def peft_config(self, targets: List[str]):
        raise NotImplementedError

    def adapt(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.count_base(model)
        targets = self.resolve_targets(model)
        return get_peft_model(model, self.peft_config(targets))

    def group_of(self, name: str) -> str:
        return "adapter"

    def reference_context(self, model: nn.Module):
        """PEFT's disable_adapter: the base layers alone and the original task head (modules_to_save keeps it),
        which is the starting model for every PEFT method that starts at zero (LoRA's B = 0, DoRA's magnitude =
        the weight's norm, VeRA's lambda_b = 0, PEFT's FRoD up to its rounding). PiSSA overrides it."""
        return model.disable_adapter()

    def param_groups(self, model: nn.Module) -> Dict[str, List[nn.Parameter]]:
        groups: Dict[str, List[nn.Parameter]] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                g = "head" if "modules_to_save" in n else self.group_of(n)
                groups.setdefault(g, []).append(p)
        return groups

    def save_adapter(self, model: nn.Module, directory: str) -> None:
        model.save_pretrained(directory)

    def load_adapter(self, base_model: nn.Module, directory: str) -> nn.Module:
        from peft import PeftModel

        self.count_base(base_model)
        return PeftModel.from_pretrained(base_model, directory, is_trainable=False)

    def merge(self, model: nn.Module) -> nn.Module:
        from frod_cli.models import base_quantization, dequantize_model

        if base_quantization(model) is None:
            return model.merge_and_unload()
        # PEFT merges into a 4-bit layer by re-quantizing W + delta, and NF4's rounding (steps of 0.08 to 0.3 of
        # a block's largest weight) swallows much of a trained update (half of it on recipe=qfrod_smoke); the
        # adapter moves onto the dequantized base instead and merges there, in model.dtype.
        state, config = self._adapter_state(model)
        return attach_and_merge(dequantize_model(model.unload()), config, state)

    def merge_into(self, model: nn.Module, base_model: nn.Module) -> nn.Module:
        """What QLoRA users ship: the same adapter merged into the unquantized base."""
        state, config = self._adapter_state(model)
        return attach_and_merge(base_model, config, state)

    @staticmethod
    def _adapter_state(model: nn.Module):
        import copy

        from peft import get_peft_model_state_dict

        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        config = copy.deepcopy(model.peft_config["default"])
        if getattr(config, "init_lora_weights", None) == "pissa":  # the saved factors already hold its result
            config.init_lora_weights = True
        config.inference_mode = True
        return state, config


def attach_and_merge(base_model: nn.Module, config, state: dict) -> nn.Module:
    """`base_model` with a PEFT adapter (`config`, trained `state`) attached and merged: a plain model."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(base_model, config)
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise FrodCliError(f"the adapter does not fit the base it is merged into: {unexpected[:3]}")
    return peft_model.merge_and_unload()


@register_method("lora", config=LoraMethodConfig)
class LoraMethod(PeftMethod):
    extra: dict = {}

    def peft_config(self, targets):
        from peft import LoraConfig

        c = self.cfg
        return LoraConfig(
            r=int(c.r),
            lora_alpha=float(c.alpha),
            lora_dropout=float(c.dropout),
            target_modules=self.paths_regex(targets),
            modules_to_save=self.modules_to_save() or None,
            **self.extra,
        )


@register_method("dora", config=LoraMethodConfig)
class DoraMethod(LoraMethod):
    extra = {"use_dora": True}


@register_method("pissa", config=LoraMethodConfig)
class PissaMethod(LoraMethod):
    """PiSSA rewrites the base weights (W - principal part). Its saved adapter is converted to a
    plain LoRA (rank 2r) that applies to the *original* base model, so reload and merge need no
    PiSSA-specific base."""

    extra = {"init_lora_weights": "pissa"}
    needs_base_weights = "PiSSA initializes from the SVD of the base weights and rewrites them"
    refuse_quantized = ("PiSSA rewrites the base weights (W minus its principal part), which a 4-bit base cannot "
                        "hold (PEFT refuses it); use model.quantization=none, or lora/dora/vera/frod on the 4-bit base")

    def adapt(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model_state_dict

        model = super().adapt(model)
        # The initial factors, for the conversion at save time.
        self._init_state = {
            k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(model).items()
            if "lora_A" in k or "lora_B" in k
        }
        return model

    def save_adapter(self, model: nn.Module, directory: str) -> None:
        """Save as a rank-2r LoRA on the original weights: with PiSSA's residual base
        W_res = W - s B0 A0, the trained model is W_res + s B A = W + s [B, -B0] [A; A0]
        (the conversion PEFT documents; done here because PEFT's own fails with modules_to_save)."""
        import copy
        import os

        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        init = getattr(self, "_init_state", None)
        if init is None:  # a reloaded adapter is already converted
            model.save_pretrained(directory)
            return
        out = {}
        for k, v in get_peft_model_state_dict(model).items():
            v = v.detach().cpu()
            if "lora_A" in k:
                v = torch.cat([v, init[k].to(v.dtype)], dim=0)
            elif "lora_B" in k:
                v = torch.cat([v, -init[k].to(v.dtype)], dim=1)
            out[k] = v.contiguous()
        cfg = copy.deepcopy(model.peft_config["default"])
        cfg.init_lora_weights = True
        cfg.r *= 2
        cfg.lora_alpha *= 2
        os.makedirs(directory, exist_ok=True)
        cfg.save_pretrained(directory)
        save_file(out, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})

    def reference_context(self, model: nn.Module):
        """PiSSA's base layers hold the residual W - s B0 A0, so switching the adapter off would give the residual,
        not the starting model; inside, the adapter holds its initial factors instead (W_res + s B0 A0 = W), and
        its trained values come back at the end. Costs one more copy of the adapter's factors for the block."""
        return _initial_factors(model, getattr(self, "_init_state", None))

    def merge(self, model: nn.Module) -> nn.Module:
        # The trained PiSSA model = residual base + adapter: merging gives the adapted weights.
        return model.merge_and_unload()


@register_method("vera", config=VeraMethodConfig)
class VeraMethod(PeftMethod):
    def peft_config(self, targets):
        from peft import VeraConfig

        c = self.cfg
        return VeraConfig(
            r=int(c.r),
            vera_dropout=float(c.dropout),
            target_modules=self.paths_regex(targets),
            modules_to_save=self.modules_to_save() or None,
            projection_prng_key=int(c.projection_seed),
            save_projection=True,
        )


@register_method("peft_frod", config=FrodKeys)
class PeftFrodMethod(PeftMethod):
    needs_base_weights = "PEFT's FRoD builds its basis from every target weight, on every process"
    refuse_quantized = ("PEFT's FRoD reads every target weight as a dense matrix and has no 4-bit layer (it "
                        "decomposes the packed bytes and fails); use method=frod, which adapts 4-bit layers")

    def __init__(self, cfg, task=None, model_cfg=None):
        super().__init__(cfg, task, model_cfg)
        check_frod_keys(cfg)

    def peft_config(self, targets):
        from peft import FrodConfig

        c = self.cfg
        return FrodConfig(
            target_modules=self.paths_regex(targets),
            modules_to_save=self.modules_to_save() or None,
            sparse_rate=float(c.sparse_rate),
            regularization_alpha=float(c.regularization),
            projection_prng_key=int(c.frod_seed),
            save_projection=True,
            progressbar=False,
        )

    def group_of(self, name: str) -> str:
        if "frod_lambda_s_values" in name:
            return "sparse"
        if "frod_lambda_l" in name:
            return "scale"
        return "adapter"


@contextlib.contextmanager
def _initial_factors(model: nn.Module, init: Optional[Dict[str, Any]]) -> Iterator[nn.Module]:
    """Inside: every lora_A / lora_B of the adapter holds its value at initialization (`init`, keyed as PEFT's
    get_peft_model_state_dict keys them: the parameter's name without the adapter name)."""
    if init is None:
        raise FrodCliError("method pissa: the adapter's initial factors are unknown (a reloaded adapter), so its "
                           "starting model cannot be rebuilt; use task.beta=0")
    swapped = []
    with torch.no_grad():
        try:
            for name, p in model.named_parameters():
                key = name.replace(".default", "")
                if key in init and ("lora_A" in name or "lora_B" in name):
                    swapped.append((p, p.detach().clone()))
                    p.copy_(init[key].to(p.device, p.dtype))
            if not swapped:
                raise RuntimeError("pissa: no adapter factor matched the initial state's keys")
            yield model
        finally:
            for p, trained in swapped:
                p.copy_(trained)
