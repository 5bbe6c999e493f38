"""Rollouts (frod_cli/rl/rollout.py, frod_cli/rl/step.py) and the starting model of every method
(Method.reference_context): sampling seeded per group (so a resumed run and N processes sample what one
uninterrupted process does), the RNG outside left alone, per-token log-probabilities of a padded batch equal to
each row's alone, the reference log-probabilities equal to the base model's, one pass with rho = 1 exactly."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.config import ModelConfig
from frod_cli.methods.base import build_method, method_config
from frod_cli.models import load_model
from frod_cli.rl import rollout as R
from frod_cli.rl.step import Collected, GrpoSettings, batch_loss, collect, rollout_metrics
from frod_cli.tasks.rewards import RewardConfig, RewardSet
from frod_cli.tasks.sources import DATA_DIR
from tiny_models import FAMILIES, llama

TASK = SimpleNamespace(auto_class="AutoModelForCausalLM", seed=0, type_name="grpo", model_kwargs=dict,
                       default_modules_to_save=(), cfg=SimpleNamespace(max_length=128, chat_template=None))
TARGETS = FAMILIES["llama"][1]


@pytest.fixture(scope="module")
def tiny():
    """tiny:llama (hidden 32, the MiniLM tokenizer) and three packaged problems as token ids."""
    model, tok = load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), TASK)
    rows = [json.loads(line) for line in (DATA_DIR / "arith_rl_tiny.jsonl").read_text().splitlines()[:3]]
    return model, tok, rows, [tok(r["prompt"])["input_ids"] for r in rows]


def test_sampling_is_seeded_per_group_and_leaves_the_rng_alone(tiny):
    model, tok, _, prompts = tiny
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = R.sample_groups(model, tok, prompts, 3, seed=5, step=2, max_new_tokens=6)
    assert torch.equal(torch.get_rng_state(), before)  # the training's own streams (dropout, data) untouched
    torch.rand(100)  # whatever else drew random numbers in between
    # groups 1 and 2 alone, as another process (or a resumed run) would sample them
    b = R.sample_groups(model, tok, prompts[1:], 3, seed=5, step=2, first_group=1, max_new_tokens=6)
    assert b.completions == a.completions[3:] and b.seeds == a.seeds[1:]
    c = R.sample_groups(model, tok, prompts, 3, seed=5, step=3, max_new_tokens=6)
    assert c.completions != a.completions  # the next step draws anew
    assert len(set(map(tuple, a.completions[:3]))) > 1  # G different samples of one prompt
    eos = tok.eos_token_id
    for row, ended in zip(a.completions, a.ended):
        assert (row[-1] == eos) == ended and (ended or len(row) == 6) and eos not in row[:-1]


def test_padded_logps_equal_each_row_alone(tiny):
    model, tok, _, prompts = tiny
    ro = R.sample_groups(model, tok, prompts, 2, seed=1, step=0, max_new_tokens=5)
    lp = R.token_logps(model, R.rollout_batch(ro, tok))
    for i, (p, c) in enumerate(zip(ro.prompt_of_row(), ro.completions)):
        alone = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
        expected = torch.stack([alone[len(p) - 1 + t, tok_id] for t, tok_id in enumerate(c)])
        assert torch.allclose(lp[i, : len(c)], expected, atol=1e-5)
        assert (lp[i, len(c):] == 0).all()


def adapted(name, **extra):
    """(base copy, adapted model, method) on the small LLaMA of tests/tiny_models.py, trainables moved off their
    start so that the policy differs from the starting model."""
    base = llama()[0]
    method = build_method(method_config(name, target_modules=list(TARGETS), **extra), None, None)
    model = method.adapt(copy.deepcopy(base))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for groups in method.param_groups(model).values():
            for p in groups:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return base, model, method


def seq_logps(model, batch):
    with torch.no_grad():
        return R.token_logps(model, batch)


@pytest.mark.parametrize("name, extra", [("frod", {"sparse_rate": 0.1}), ("lora", {}), ("dora", {}), ("vera", {"r": 8}),
                                         ("pissa", {"r": 4})])
def test_reference_context_gives_the_starting_model(name, extra):
    base, model, method = adapted(name, **extra)
    assert method.reference_refusal() is None
    batch = R.completion_batch([[1, 5, 9], [2, 7]], [[12, 40, 2], [17, 3]], pad_id=0)
    start, policy = seq_logps(base, batch), seq_logps(model, batch)
    assert not torch.allclose(start, policy, atol=1e-4)  # the trainables moved
    with method.reference_context(model):
        reference = seq_logps(model, batch)
    assert torch.allclose(reference, start, atol=1e-5), (reference - start).abs().max()
    assert torch.equal(seq_logps(model, batch), policy)  # the trained values are back, bit for bit


def test_reference_refusals():
    full = build_method(method_config("full"), None, None)
    assert "second copy of the model" in full.reference_refusal()
    with pytest.raises(FrodCliError, match="task.beta=0"):
        full.reference_context(llama()[0])
    frod = build_method(method_config("frod", modules_to_save=["lm_head"]), None, None)
    assert "modules_to_save" in frod.reference_refusal()


def test_collect_and_one_pass(tiny):
    """A rollout through the step's pieces: rewards, metrics, advantages; pass 0 with rho = 1 exactly; a second
    pass against the stored rollout log-probabilities; the reference with beta > 0 (frod: its adapter off)."""
    model, tok, rows, prompts = tiny
    method = build_method(method_config("frod", sparse_rate=0.1, target_modules=list(TARGETS)), None, None)
    model = method.adapt(copy.deepcopy(model))
    rewards = RewardSet.from_configs([OmegaConf.structured(RewardConfig(name="format", pattern=r"\d")),
                                      OmegaConf.structured(RewardConfig(name="math"))])
    s = GrpoSettings(group_size=4, max_completion_length=5, num_iterations=2, beta=0.1)
    data = collect(model, method, tok, prompts, [r["prompt"] for r in rows], {"answer": [r["answer"] for r in rows]},
                   rewards, s, seed=0, step=0)
    assert data.advantages.shape == (12,) and data.old_logps.shape == data.ref_logps.shape
    assert data.num_tokens == sum(len(c) for c in data.rollout.completions)
    figures = rollout_metrics(data.scores, *data.lengths_and_ended(), 4)
    assert {"reward/format/mean", "reward/math/mean", "reward/mean", "groups_all_equal", "completion_length/mean",
            "completion_length/cut"} <= set(figures)
    assert figures["completion_length/max"] == max(len(c) for c in data.rollout.completions) <= 5
    # FRoD starts at its base exactly: the reference equals the rollout policy before any step
    assert torch.allclose(data.ref_logps, data.old_logps, atol=1e-5)
    loss, m = batch_loss(model, data, tok, range(12), s, iteration=0)
    assert float(m["ratio_min"]) == float(m["ratio_max"]) == 1.0 and float(m["clip_fraction"]) == 0.0
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.param_groups(model)["sparse"])
    _, m2 = batch_loss(model, data, tok, [0, 1, 2, 3], s, iteration=1)
    assert float(m2["ratio_mean"]) == pytest.approx(1.0, abs=1e-4)  # the weights have not moved yet
    # a rollout kept across a checkpoint (tensors and JSON values, no pickle) gives the same loss
    state = data.state_dict("buffer.")
    assert all(torch.is_tensor(v) or json.loads(json.dumps(v)) == v for v in state.values())
    again = Collected.from_state(state, "buffer.", "cpu")
    with torch.no_grad():
        for it in (0, 1):
            assert torch.equal(batch_loss(model, again, tok, range(12), s, iteration=it)[0],
                               batch_loss(model, data, tok, range(12), s, iteration=it)[0])
