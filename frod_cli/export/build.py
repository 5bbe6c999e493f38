"""The exports end to end on models already loaded: a frod FRoD model -> PEFT FRoD adapter or LoRA adapter in a
directory, and the checks that the written adapter, loaded back by PEFT, is the model it claims to be."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from frod_cli import FrodCliError
from frod_cli.export.lora import LoraAdapter, lora_pair
from frod_cli.export.peft_frod import ADAPTER, Alignment, fill_peft_model, weight_errors

TASK_TYPES = {"AutoModelForCausalLM": "CAUSAL_LM", "AutoModelForSequenceClassification": "SEQ_CLS"}


def relative_diff(new: torch.Tensor, reference: torch.Tensor) -> float:
    """max|new - reference| / max|reference|: one number for 'the same up to rounding' at any scale."""
    return float((new.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-30))


def head_states(model: nn.Module, names: Sequence[str]) -> Dict[str, Dict[str, torch.Tensor]]:
    """The trained modules that travel whole (a task head): module path -> its state, float32 copies on the CPU."""
    return {n: {k: v.detach().float().cpu().clone() for k, v in model.get_submodule(n).state_dict().items()}
            for n in names}


def target_names(model: nn.Module, layers: Sequence[str]) -> List[str]:
    """What adapter_config.json names as target_modules: the shortest common path endings (`q_proj`,
    `attention.output.dense`) when PEFT's suffix rule selects exactly `layers` in `model`, else the full paths."""
    from frod_cli.frod import target_matches

    wanted = set(layers)
    names = [n for n, _ in model.named_modules() if n]
    for k in (1, 2, 3):
        ends = sorted({".".join(n.split(".")[-k:]) for n in layers})
        if any(p.isdigit() for e in ends for p in e.split(".")):
            break
        if {n for n in names if target_matches(n, ends)} == wanted:
            return ends
    return sorted(wanted)


def frod_layer_names(model: nn.Module) -> List[str]:
    from frod_cli.frod import frod_layers

    return [n for n, _ in frod_layers(model)]


# ---- format=peft ----------------------------------------------------------------------------------------------
def peft_frod_config(frod_config: Dict[str, Any], layers: Sequence[str], heads: Sequence[str],
                     task_type: Optional[str], base_model: Optional[str]):
    """PEFT's FrodConfig naming exactly frod's layers and hyperparameters, the projections saved."""
    from peft import FrodConfig

    return FrodConfig(target_modules=list(layers), sparse_rate=float(frod_config["sparse_rate"]),
                      regularization_alpha=float(frod_config["regularization"]),
                      projection_prng_key=int(frod_config["seed"]), save_projection=True,
                      modules_to_save=list(heads) or None, progressbar=False, task_type=task_type,
                      base_model_name_or_path=base_model)


def write_peft_frod(frod_model: nn.Module, frod_config: Dict[str, Any], heads: Dict[str, Dict[str, torch.Tensor]],
                    base: nn.Module, directory: str, task_type: Optional[str],
                    base_model: Optional[str]) -> List[Alignment]:
    """PEFT builds its FRoD on `base` (its own V, U, sigma), takes frod's trained values in its basis, and
    saves adapter_config.json + adapter_model.safetensors into `directory`."""
    from peft import get_peft_model

    layers = frod_layer_names(frod_model)
    peft_model = get_peft_model(base, peft_frod_config(frod_config, layers, list(heads), task_type, base_model))
    alignments = fill_peft_model(frod_model, peft_model, heads)
    saved = peft_model.peft_config[ADAPTER]
    # PEFT's sequence-classification wrapper appends its default head names (classifier, score) to the config;
    # the file names only the modules that travel (PEFT adds its defaults again at load)
    saved.modules_to_save = list(heads) or None
    saved.base_model_name_or_path = base_model
    peft_model.save_pretrained(directory, save_embedding_layers=False)  # no embedding is adapted (no Hub look-up)
    return alignments


def check_peft_frod(frod_model: nn.Module, loaded: nn.Module, alignments: List[Alignment], logits: float,
                    tolerance: float) -> Dict[str, Any]:
    """The reloaded PEFT model against frod's, per layer (adapted weights) and on the batch (`logits`: the relative
    difference of the outputs); refuses past `tolerance`, naming the worst layer and why it differs."""
    errors = weight_errors(frod_model, loaded)
    category_of = {}
    for name in errors:
        category = frod_model.get_submodule(name).category.key
        category_of[name] = next(a for a in alignments if a.key == category)
    worst = max(errors, key=errors.get)
    layers = [{"layer": n, "relative_weight_error": e, "peft_category": category_of[n].peft_category,
               "mixing": category_of[n].mixing} for n, e in errors.items()]
    if errors[worst] > tolerance or logits > tolerance:
        al = category_of[worst]
        raise FrodCliError(
            f"PEFT's reload differs from frod's model beyond the tolerance {tolerance:g}: layer {worst} by "
            f"{errors[worst]:.2e} of its weight's scale, the logits by {logits:.2e}; PEFT recomputes V at load and "
            f"its V of category {al.peft_category!r} matches frod's up to sign and order only to {al.mixing:.1e} "
            "(near-equal HO-GSVD eigenvalues mix directions); use format=lora or format=merged, or accept it with "
            "tolerance=<larger>")
    return {"layers": layers, "max_relative_weight_error": errors[worst], "worst_layer": worst}


# ---- format=lora ----------------------------------------------------------------------------------------------
def lora_adapter(frod_model: nn.Module, heads: Dict[str, Dict[str, torch.Tensor]], rank: Optional[int],
                 energy: Optional[float]) -> LoraAdapter:
    """Every FRoD layer's dW (float32) as a LoRA pair of rank `rank` or of the `energy` rule."""
    from frod_cli.frod import frod_layers

    with torch.no_grad():
        pairs = [lora_pair(name, layer.delta_weight(), rank, energy) for name, layer in frod_layers(frod_model)]
    return LoraAdapter(pairs, dict(heads))


def check_lora(adapter: LoraAdapter, loaded: nn.Module) -> None:
    """Each layer PEFT loaded computes B A (a key PEFT did not read would leave lora_B at zero): a bug otherwise."""
    tuner = loaded.base_model
    with torch.no_grad():
        for p in adapter.pairs:
            layer = tuner.model.get_submodule(p.name)
            got = layer.get_delta_weight(ADAPTER).float().cpu()
            want = p.B @ p.A
            if got.shape != want.shape:
                got = got.T  # Conv1D stores W as in x out
            if relative_diff(got, want) > 1e-5:
                raise RuntimeError(f"PEFT loaded layer {p.name} of the LoRA export wrong "
                                   f"(relative difference {relative_diff(got, want):.2e})")


def compare_outputs(reference: nn.Module, other: nn.Module, batch: Dict[str, Any],
                    outputs: Callable[[nn.Module, Dict[str, Any]], torch.Tensor]) -> Dict[str, float]:
    with torch.no_grad():
        a, b = outputs(reference, batch), outputs(other, batch)
    return {"max_abs_diff": float((a - b).abs().max()), "relative_diff": relative_diff(b, a)}
