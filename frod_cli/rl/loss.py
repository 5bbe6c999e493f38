"""The GRPO-family policy loss, a pure function of tensors (TRL's split: the code that samples, scores and
computes log-probabilities is elsewhere, frod_cli/rl/rollout.py; a test checks the formulas alone).

Notation, for one optimization batch of N = (groups x G) completions o_i of the prompts q:
  r_i            the total reward of o_i (frod_cli/tasks/rewards.py), G completions per prompt (a group)
  A_i            its advantage, one value for every token of o_i (`group_advantages`)
  logp_it        log pi_theta(o_it | q, o_i,<t), the policy being trained (with gradient)
  old_it         the same under the rollout policy pi_old, the weights that sampled o_i (no gradient)
  ref_it         the same under the reference pi_ref, the starting model (only when beta > 0)
  m_it           1 on the completion's tokens (its EOS included), 0 on padding; |o_i| = sum_t m_it
  rho_it         exp(logp_it - old_it), the importance ratio (exactly 1 in the first pass over a batch)
  l_it           -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it
  k3_it          exp(ref_it - logp_it) - (ref_it - logp_it) - 1 (Schulman's k3 estimator of KL(pi_theta || pi_ref),
                 non-negative per token, unbiased in expectation over o ~ pi_theta)

The variants differ in how advantages are scaled and how l_it is averaged (`VARIANTS`):
  grpo     A_i = (r_i - mean_g r) / (std_g r + eps)        L = 1/N sum_i ( 1/|o_i| sum_t m_it l_it )
           (DeepSeekMath, Shao et al. 2024: the per-sequence mean, then the mean over sequences)
  dr_grpo  A_i = r_i - mean_g r                            L = 1/(N L_max) sum_i sum_t m_it l_it
           (Dr. GRPO, Liu et al. 2025: no std scaling and a constant normalizer, L_max = the completion
           length limit, so neither long answers nor easy groups weigh differently per token; per group this
           is sum / (G L_max), averaged over the groups)
  dapo     A_i as grpo                                     L = 1/(sum_it m_it) sum_i sum_t m_it l_it
           (DAPO, Yu et al. 2025: the token-level mean over the batch, and a wider upper clip eps_high = 0.28
           than the lower eps_low = 0.2, "clip-higher", so that unlikely tokens can still grow)
std_g is the unbiased standard deviation of the group's rewards (torch.std), eps = 1e-4, as TRL computes it.

Split a batch into micro-batches and the losses still add up to the batch's when every call receives the batch's
`num_sequences` (grpo, dr_grpo) and `num_tokens` (dapo): each call divides by the batch's counts, not its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class Variant:
    name: str
    scale_by_std: bool  # A = (r - mean) / (std + eps), else r - mean
    normalizer: str  # sequence | constant | token: how the token terms are averaged (module docstring)
    epsilon_high: float  # the upper clip's default (the lower one defaults to 0.2 for every variant)


VARIANTS: Dict[str, Variant] = {
    "grpo": Variant("grpo", True, "sequence", 0.2),
    "dr_grpo": Variant("dr_grpo", False, "constant", 0.2),
    "dapo": Variant("dapo", True, "token", 0.28),
}
EPSILON_LOW = 0.2


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown GRPO loss variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """A_i from the total rewards of N = groups x G completions, each group's G rewards consecutive:
    r_i - mean of its group, divided by (the group's std + eps) when `scale_by_std`. A group whose rewards are
    all equal gets A = 0 for all its completions (it carries no signal). Returns [N] (float32)."""
    r = rewards.detach().float().reshape(-1, int(group_size))
    centered = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def _normalizer(kind: Variant, mask: torch.Tensor, num_sequences: Optional[float], num_tokens: Optional[float],
                max_completion_length: Optional[int]) -> Tuple[torch.Tensor, float]:
    """(per-sequence weight [N, 1], the divisor) such that L = sum_it weight_i m_it l_it / divisor."""
    n = float(num_sequences if num_sequences is not None else mask.shape[0])
    if kind.normalizer == "sequence":
        return 1.0 / mask.sum(dim=1, keepdim=True).clamp(min=1.0), n
    ones = torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)
    if kind.normalizer == "constant":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError("dr_grpo needs max_completion_length (the completion length limit L_max)")
        return ones, n * float(max_completion_length)
    return ones, float(num_tokens) if num_tokens is not None else float(mask.sum().clamp(min=1.0))


def policy_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
                old_logp: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0,
                epsilon_low: float = EPSILON_LOW, epsilon_high: Optional[float] = None,
                max_completion_length: Optional[int] = None, num_sequences: Optional[float] = None,
                num_tokens: Optional[float] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss L of `loss_type` (module docstring) and its metrics, from per-token tensors [N, T]: `logp` (with
    gradient), `old_logp` (None: the first pass over the batch, pi_old = pi_theta, rho = 1 exactly), `ref_logp`
    (needed when beta > 0), `mask` (completion tokens), and `advantages` [N]. epsilon_high None: the variant's.
    Metrics (detached, over the completion tokens): clip_low (rho < 1 - eps_low where A < 0: the lower clip
    holds the term), clip_high (rho > 1 + eps_high where A > 0), clip_fraction (either), ratio_mean, ratio_min,
    ratio_max, and kl (mean k3) when beta > 0."""
    kind = variant(loss_type)
    eps_high = kind.epsilon_high if epsilon_high is None else float(epsilon_high)
    m = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.dtype).reshape(-1, 1)
    term = -torch.min(ratio * adv, torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high) * adv)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probabilities (ref_logp)")
        delta = ref_logp.to(logp.dtype) - logp
        kl = torch.exp(delta) - delta - 1.0
        term = term + beta * kl
    weight, divisor = _normalizer(kind, m, num_sequences, num_tokens, max_completion_length)
    loss = (term * m * weight).sum() / divisor
    return loss, _metrics(ratio.detach(), adv.detach(), m, epsilon_low, eps_high, None if kl is None else kl.detach())


def _metrics(ratio: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, eps_low: float, eps_high: float,
             kl: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    tokens = m.sum().clamp(min=1.0)
    on = m > 0
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(m.dtype) * m
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(m.dtype) * m
    out = {"clip_low": low.sum() / tokens, "clip_high": high.sum() / tokens,
           "clip_fraction": (low + high).sum() / tokens, "ratio_mean": (ratio * m).sum() / tokens,
           "ratio_min": ratio[on].min() if on.any() else ratio.new_ones(()),
           "ratio_max": ratio[on].max() if on.any() else ratio.new_ones(())}
    if kl is not None:
        out["kl"] = (kl * m).sum() / tokens
    return out
