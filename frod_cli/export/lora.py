"""A weight update dW as a LoRA pair in PEFT's LoRA format (what vLLM, SGLang and transformers' load_adapter read).

For one layer, dW (m x n, float32) = U S V^T (its SVD). The rank-r truncation keeps the r largest singular
values, which is the best rank-r approximation in the Frobenius norm (Eckart-Young), so what is lost is exactly
the tail of S:

    B = U_r diag(S_r)   (m x r)      A = V_r^T   (r x n)      dW_r = B A
    relative error of dW = ||dW - B A||_F / ||dW||_F = sqrt(sum_{k > r} S_k^2 / sum_k S_k^2)

The scale sits in B and lora_alpha equals the rank, so PEFT's scaling alpha / r is 1 for every layer (vLLM reads
only the global r and lora_alpha, never rank_pattern or alpha_pattern: a scaling of 1 everywhere is the one
convention it cannot misread).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules


@dataclass
class LoraPair:
    """One layer's factors and what the truncation lost."""

    name: str
    A: torch.Tensor  # r x n
    B: torch.Tensor  # m x r
    rank: int
    full_rank: int  # min(m, n)
    tail_energy: float  # sum_{k > r} S_k^2
    total_energy: float  # sum_k S_k^2 = ||dW||_F^2

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.tail_energy / self.total_energy) if self.total_energy > 0 else 0.0


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest r whose squared singular values reach `energy` of their sum (at least 1)."""
    power = S.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0)
    # the first index where the running sum reaches the fraction; rounding may leave the last one just short
    r = int(torch.searchsorted(cumulative, torch.tensor(energy * total, dtype=torch.float64)).item()) + 1
    return min(r, S.numel())


def lora_pair(name: str, dW: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None) -> LoraPair:
    """dW (m x n) as B A of rank `rank` (clipped to min(m, n)) or of the `energy` rule."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    dW = dW.detach().float()
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    r = min(int(rank), S.numel()) if rank is not None else energy_rank(S, float(energy))
    power = S.double() ** 2
    B = (U[:, :r] * S[:r]).contiguous()
    A = Vh[:r].contiguous()
    return LoraPair(name, A, B, r, S.numel(), float(power[r:].sum()), float(power.sum()))


@dataclass
class LoraAdapter:
    """Every layer's pair plus the trained modules that travel whole (PEFT's modules_to_save)."""

    pairs: List[LoraPair]
    modules_to_save: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> its state

    @property
    def relative_error(self) -> float:
        """sqrt(sum of every layer's lost energy / sum of every layer's energy): the error of the whole update."""
        total = sum(p.total_energy for p in self.pairs)
        return math.sqrt(sum(p.tail_energy for p in self.pairs) / total) if total > 0 else 0.0

    @property
    def max_rank(self) -> int:
        return max(p.rank for p in self.pairs)

    def peft_config(self, target_modules: Sequence[str], fan_in_fan_out: bool = False, task_type: Optional[str] = None,
                    base_model: Optional[str] = None):
        """PEFT's LoraConfig: r = lora_alpha = the largest rank; layers of another rank in rank_pattern and
        alpha_pattern with alpha = their rank, so every layer's scaling is 1."""
        from peft import LoraConfig

        r = self.max_rank
        other = {p.name: p.rank for p in self.pairs if p.rank != r}
        return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(target_modules),
                          rank_pattern=dict(other), alpha_pattern=dict(other), fan_in_fan_out=fan_in_fan_out,
                          modules_to_save=sorted(self.modules_to_save) or None, task_type=task_type,
                          base_model_name_or_path=base_model, bias="none")

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """PEFT's saved keys: `<prefix><layer>.lora_A.weight`, `...lora_B.weight`, `<prefix><module>.<param>`."""
        out = {}
        for p in self.pairs:
            out[f"{PREFIX}{p.name}.lora_A.weight"] = p.A.cpu()
            out[f"{PREFIX}{p.name}.lora_B.weight"] = p.B.cpu()
        for module, state in self.modules_to_save.items():
            for key, value in state.items():
                out[f"{PREFIX}{module}.{key}"] = value.detach().cpu().contiguous()
        return out

    def save(self, directory: str, config) -> None:
        """adapter_config.json + adapter_model.safetensors into an existing directory."""
        from safetensors.torch import save_file

        config.save_pretrained(directory)
        save_file(self.state_dict(), f"{directory}/{WEIGHTS_NAME}", metadata={"format": "pt"})

    def layer_report(self) -> List[dict]:
        return [{"layer": p.name, "rank": p.rank, "full_rank": p.full_rank, "relative_error": p.relative_error}
                for p in self.pairs]
