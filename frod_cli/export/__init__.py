"""Exports of a trained model for serving: a FRoD adapter as PEFT's FRoD adapter (peft_frod.py), a weight update
as a LoRA adapter in PEFT's format (lora.py), and the pipelines over loaded models with their checks (build.py).
Torch, safetensors and PEFT; the verb is frod_cli/commands/export.py."""
from frod_cli.export.build import (TASK_TYPES, check_lora, check_peft_frod, compare_outputs, frod_layer_names,
                                   head_states, lora_adapter, relative_diff, target_names, write_peft_frod)
from frod_cli.export.lora import LoraAdapter, LoraPair, energy_rank, lora_pair
from frod_cli.export.peft_frod import Alignment, align, fill_peft_model, peft_format_note, weight_errors

__all__ = ["TASK_TYPES", "Alignment", "LoraAdapter", "LoraPair", "align", "check_lora", "check_peft_frod",
           "compare_outputs", "energy_rank", "fill_peft_model", "frod_layer_names", "head_states", "lora_adapter",
           "lora_pair", "peft_format_note", "relative_diff", "target_names", "weight_errors", "write_peft_frod"]
