"""The GRPO-family loss (frod_cli/rl/loss.py) against computations written here: per-token log-probabilities
from a plain transformers forward of each row alone (no padding), the formulas of each variant as loops over
rows and tokens, and the advantages by hand."""
from __future__ import annotations

import math

import pytest
import torch

from frod_cli.rl import loss as L
from frod_cli.rl import rollout as R
from tiny_models import llama

PROMPTS = [[1, 5, 9], [2, 7], [3, 4, 8, 11, 6]]
COMPLETIONS = [[12, 40, 2], [17], [21, 22, 23, 24], [30, 31], [50, 51, 52, 53, 54], [60]]  # G = 2 per prompt
REWARDS = [1.0, 0.0, 0.5, 0.5, 2.0, -1.0]
G, L_MAX = 2, 6


@pytest.fixture(scope="module")
def model():
    return llama()[0].train()


def plain_logps(model, prompt, completion):
    """log p(o_t | q, o_<t) of one row, from the model's logits on that row alone."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return [logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)]


def by_hand_advantages(rewards, scale):
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g : g + G]
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        out += [(r - mean) / (std + 1e-4) if scale else r - mean for r in group]
    return out


def test_group_advantages_by_hand():
    got = L.group_advantages(torch.tensor(REWARDS), G, scale_by_std=True)
    assert torch.allclose(got, torch.tensor(by_hand_advantages(REWARDS, True)), atol=1e-6)
    got = L.group_advantages(torch.tensor(REWARDS), G, scale_by_std=False)
    assert torch.allclose(got, torch.tensor(by_hand_advantages(REWARDS, False)), atol=1e-6)
    assert got[2] == 0 and got[3] == 0  # a group of equal rewards carries no signal


def by_hand_loss(variant, lp, old, ref, adv, beta, eps_low, eps_high):
    """The variant's formula (module docstring of frod_cli/rl/loss.py) as loops."""
    seq_terms, total, tokens = [], 0.0, 0
    for i, row in enumerate(lp):
        terms = []
        for t, logp in enumerate(row):
            ratio = torch.exp(logp - old[i][t])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            term = -torch.min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logp
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        seq_terms.append(sum(terms) / len(terms))
        total, tokens = total + sum(terms), tokens + len(terms)
    if variant == "grpo":
        return sum(seq_terms) / len(lp)
    if variant == "dr_grpo":
        return total / (len(lp) * L_MAX)
    return total / tokens


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_loss_equals_the_formula_on_plain_transformers_logps(model, variant):
    """Old and reference log-probabilities moved off the policy's (so the clip and the KL term act), beta > 0."""
    prompts = [p for p in PROMPTS for _ in range(G)]
    plain = [plain_logps(model, p, c) for p, c in zip(prompts, COMPLETIONS)]
    shift = torch.Generator().manual_seed(3)
    old = [[float(x.detach()) + float(torch.randn((), generator=shift)) * 0.3 for x in row] for row in plain]
    ref = [[float(x.detach()) + float(torch.randn((), generator=shift)) * 0.5 for x in row] for row in plain]
    kind = L.VARIANTS[variant]
    adv = by_hand_advantages(REWARDS, kind.scale_by_std)
    expected = by_hand_loss(variant, plain, old, ref, adv, 0.05, 0.2, kind.epsilon_high)

    batch = R.completion_batch(prompts, COMPLETIONS, pad_id=0)
    logp = R.token_logps(model, batch)
    width = logp.shape[1]
    pad = lambda rows: torch.tensor([r + [0.0] * (width - len(r)) for r in rows])  # noqa: E731
    advantages = L.group_advantages(torch.tensor(REWARDS), G, kind.scale_by_std)
    got, metrics = L.policy_loss(logp, advantages, batch["completion_mask"], loss_type=variant, old_logp=pad(old),
                                 ref_logp=pad(ref), beta=0.05, max_completion_length=L_MAX)
    assert torch.allclose(got, expected.detach(), atol=1e-5), (float(got), float(expected))
    assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["kl"]) > 0
    # the gradient too: one parameter, through both computations
    weight = model.model.layers[0].mlp.down_proj.weight
    (g_got,) = torch.autograd.grad(got, weight)
    (g_exp,) = torch.autograd.grad(expected, weight)
    assert torch.allclose(g_got, g_exp, atol=1e-6)


def test_one_pass_ratio_is_exactly_one_and_the_clip_inactive(model):
    prompts = [p for p in PROMPTS for _ in range(G)]
    batch = R.completion_batch(prompts, COMPLETIONS, pad_id=0)
    logp = R.token_logps(model, batch)
    adv = L.group_advantages(torch.tensor(REWARDS), G)
    for variant in L.VARIANTS:
        loss, m = L.policy_loss(logp, adv, batch["completion_mask"], loss_type=variant, max_completion_length=L_MAX,
                                epsilon_low=0.0, epsilon_high=0.0)  # even a zero-width clip lets rho = 1 through
        assert float(m["ratio_min"]) == 1.0 and float(m["ratio_max"]) == 1.0 and float(m["ratio_mean"]) == 1.0
        assert float(m["clip_fraction"]) == 0.0 and "kl" not in m
        assert loss.requires_grad


def test_micro_batches_add_up_to_the_batch(model):
    """Each micro-batch divided by the whole batch's counts: the losses (and so the gradients) add up."""
    prompts = [p for p in PROMPTS for _ in range(G)]
    adv = L.group_advantages(torch.tensor(REWARDS), G)
    tokens = sum(map(len, COMPLETIONS))
    for variant in L.VARIANTS:
        whole = R.completion_batch(prompts, COMPLETIONS, pad_id=0)
        full, _ = L.policy_loss(R.token_logps(model, whole), adv, whole["completion_mask"], loss_type=variant,
                                max_completion_length=L_MAX)
        parts = 0.0
        for rows in ([0, 3, 4], [1, 2, 5]):
            b = R.completion_batch([prompts[i] for i in rows], [COMPLETIONS[i] for i in rows], pad_id=0)
            part, _ = L.policy_loss(R.token_logps(model, b), adv[rows], b["completion_mask"], loss_type=variant,
                                    max_completion_length=L_MAX, num_sequences=len(COMPLETIONS), num_tokens=tokens)
            parts = parts + part
        assert torch.allclose(parts, full, atol=1e-6), variant


def test_bad_calls():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        L.policy_loss(lp, torch.zeros(2), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        L.policy_loss(lp, torch.zeros(2), torch.ones(2, 3), loss_type="dr_grpo")
    with pytest.raises(ValueError, match="unknown GRPO loss variant"):
        L.variant("ppo")
