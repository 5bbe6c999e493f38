"""Training features around the loop: activation checkpointing (every method, FRoD included, gives the
same loss and trainable gradients) and experiment trackers (TensorBoard event files under the run)."""
from __future__ import annotations

import json

import pytest
import torch

from frod_cli.cli import main
from frod_cli.methods import CONFIGS, available, method_config

SMALL = {"r": 4, "alpha": 8, "sparse_rate": 0.05}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def loss_and_grads(name: str, checkpointing: bool):
    from frod_cli.methods import build_method
    from frod_cli.config import ModelConfig
    from omegaconf import OmegaConf

    fields = CONFIGS[name].__dataclass_fields__
    cfg = method_config(name, **{k: v for k, v in SMALL.items() if k in fields})
    mcfg = OmegaConf.structured(ModelConfig(name_or_path="tiny:llama", target_modules=["q_proj", "v_proj", "up_proj"]))
    method = build_method(cfg, None, mcfg)
    model = method.adapt(tiny_llama())
    if name != "full":  # move the adapter off its (output-preserving) start so every gradient is non-trivial
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for n, p in model.named_parameters():
                if p.requires_grad and ("frod_s" in n or "lora_B" in n or "vera_lambda_b" in n):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    base = getattr(model, "get_base_model", lambda: model)()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("name", available())
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    loss0, g0 = loss_and_grads(name, False)
    loss1, g1 = loss_and_grads(name, True)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    assert any(g.abs().max() > 0 for g in g0.values())


@pytest.mark.slow
def test_tensorboard_tracker_with_gradient_checkpointing(tmp_path):
    """`train.log_with=[tensorboard]`: event files under <run>/trackers with the loss, the learning rates and
    the validation metrics; the composed config as hyperparameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    # selected on exact match, which a few steps leave at 0.0: the final objective logged must be 0.0, not NaN
    assert main(["train", "recipe=sft_smoke", "train.gradient_checkpointing=true", "train.log_with=[tensorboard]",
                 "task.objective=exact_match", "task.objective_mode=max",
                 "train.progress=false", f"hydra.run.dir={run}"]) == 0
    events = sorted((run / "trackers").rglob("events.out.tfevents.*"))
    assert events, list(run.rglob("*"))
    tags, scalars = set(), {}
    for f in events:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        scalars.update({t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
    assert {"train/loss", "validation/loss", "validation/exact_match"} <= tags, tags
    assert any(t.startswith("train/lr/") for t in tags)
    # the final objective as metrics.json has it
    final = json.loads((run / "metrics.json").read_text())
    assert scalars["final/objective_value"] == [pytest.approx(final["objective_value"])]


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 7), (3, 10), (5, 5), (4, 1)])
def test_schedules_equal_transformers_at_every_step(name, warmup, total):
    """builders.lr_factor (written out so that a run need not import transformers.optimization, which imports PEFT)
    gives the learning rates of transformers' get_scheduler exactly, step by step, on two parameter groups; and a
    scheduler state saved by the transformers one (a checkpoint written before) resumes into ours."""
    from omegaconf import OmegaConf
    from transformers import get_scheduler

    from frod_cli.training.builders import build_scheduler

    def optimizer():
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
                  {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 3e-4}]
        return torch.optim.SGD(groups, lr=0.1)

    cfg = OmegaConf.create({"scheduler": name, "warmup_steps": warmup, "warmup_ratio": 0.0})
    ours_opt, theirs_opt = optimizer(), optimizer()
    ours, got_warmup = build_scheduler(ours_opt, cfg, total)
    theirs = get_scheduler("constant_with_warmup" if name == "constant" else name, theirs_opt,
                           num_warmup_steps=warmup, num_training_steps=total)
    assert got_warmup == warmup
    for step in range(total + 2):
        assert ours.get_last_lr() == theirs.get_last_lr(), (step, ours.get_last_lr(), theirs.get_last_lr())
        ours_opt.step(), theirs_opt.step()
        ours.step(), theirs.step()
    resumed, _ = build_scheduler(optimizer(), cfg, total)
    resumed.load_state_dict(theirs.state_dict())
    assert resumed.last_epoch == theirs.last_epoch and resumed.get_last_lr() == theirs.get_last_lr()
