"""One battery over every registered method (the registry, not a list: a new method is tested without
editing this file) on a tiny BERT classifier: adapt, train a few steps (the loss moves), save + reload the
adapter onto a fresh base model, merge (the plain model gives the adapted model's logits), and the merged
model reloads with plain transformers. Plus the per-method configs and the one target matcher."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from frod_cli.config import ModelConfig
from frod_cli.methods import CONFIGS, available, build_method, get_method, method_config

ALL = available()
SMALL = {"r": 4, "alpha": 8, "sparse_rate": 0.05}  # small sizes for whichever method has these keys


class FakeTask:
    default_modules_to_save = ("classifier",)


def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (8, 12), generator=g),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
            "labels": torch.randint(0, 3, (8,), generator=g)}


def method_for(name: str, **kw):
    fields = CONFIGS[name].__dataclass_fields__
    cfg = method_config(name, **{k: v for k, v in SMALL.items() if k in fields}, **kw)
    mcfg = OmegaConf.structured(ModelConfig(name_or_path="tiny:bert", target_modules=["query", "key", "value", "dense"]))
    return build_method(cfg, FakeTask(), mcfg)


def test_registry_has_every_method():
    assert {"frod", "full", "lora", "dora", "pissa", "vera", "peft_frod"} <= set(ALL)
    assert set(CONFIGS) == set(ALL)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


def test_method_configs_refuse_keys_of_other_methods():
    with pytest.raises(Exception, match="sparse_rate"):
        method_config("lora", sparse_rate=0.5)
    cfg = method_config("lora")
    with pytest.raises(Exception, match="sparse_rate"):
        cfg.sparse_rate = 0.5
    assert "projection_seed" in CONFIGS["vera"].__dataclass_fields__  # VeRA's own PRNG key, not FRoD's seed


@pytest.mark.parametrize("spec, expected", [
    (["attention.output.dense"], {"bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense"}),
    (["query"], {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"}),
    (r".*\.1\.attention\.self\.(query|value)", {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"}),
])
def test_one_target_matcher(spec, expected):
    """PEFT's rule in every method: a list is suffixes of module paths (a one-element list holding a dot
    included), a single string is a regex; the core's matcher picks the same layers."""
    from frod_cli.frod import FrodConfig, find_targets

    model = base_model()
    for name in ALL:
        assert set(method_for(name, target_modules=spec).resolve_targets(model)) == expected, name
    core = FrodConfig(target_modules=spec, modules_to_save=["classifier"])
    assert {n for n, _ in find_targets(model, core)} == expected


def test_targets_exclude_head_and_respect_layers():
    m = method_for("lora", layers_to_transform=[1])
    names = m.resolve_targets(base_model())
    assert names and all(".1." in n for n in names)
    assert not any(n.startswith("classifier") for n in names)


@pytest.mark.parametrize("name", ALL)
def test_method_battery(name, tmp_path):
    b = batch()
    method = method_for(name)
    model = method.adapt(base_model())
    with torch.no_grad():
        init_logits = model(**b).logits
        base_logits = base_model()(**b).logits
    if name not in ("full",):  # every adapter starts as the base model
        assert torch.allclose(init_logits, base_logits, atol=1e-4), name

    groups = method.param_groups(model)
    assert groups and all(len(v) for v in groups.values())
    if name in ("frod", "peft_frod"):
        assert {"sparse", "scale", "head"} <= set(groups)
    else:
        assert "head" in groups
    n_groups = sum(p.numel() for v in groups.values() for p in v)
    assert n_groups == sum(p.numel() for p in model.parameters() if p.requires_grad)
    summ = method.trainable_summary(model)
    assert 0 < summ["trainable_percent"] <= 100.0

    opt = torch.optim.AdamW([{"params": v} for v in groups.values()], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (name, losses)
    model.eval()
    with torch.no_grad():
        trained = model(**b).logits
    assert not torch.allclose(trained, init_logits)

    # save / reload onto a fresh base model
    method.save_adapter(model, str(tmp_path / "adapter"))
    reloaded = method_for(name).load_adapter(base_model(), str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**b).logits, trained, atol=1e-5), name

    # merge: the plain architecture, same logits, loads with transformers alone
    merged = method.merge(model)
    assert type(merged) is BertForSequenceClassification
    merged.eval()
    with torch.no_grad():
        assert (merged(**b).logits - trained).abs().max().item() < 1e-5, name
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (plain(**b).logits - trained).abs().max().item() < 1e-5, name


def test_method_yamls_carry_only_what_their_dataclass_does_not_default():
    """A default lives in one place: a method YAML sets a key only where its value differs from the config
    dataclass's default (frod_cli/methods/<file>.py)."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from frod_cli.methods import CONFIGS, discover

    discover()
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes" / "method").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        node.pop("defaults", None)
        defaults = {f.name: f.default for f in dataclasses.fields(CONFIGS[path.stem])}
        same = {k: v for k, v in node.items() if k in defaults and defaults[k] == v}
        assert same == {}, f"{path.name} repeats its dataclass's defaults {same}"
