"""Task registry, data sources, splits, and each task type end to end through a tiny model."""
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from frod_cli import models
from frod_cli.config import ModelConfig
from frod_cli.tasks import task_config
from frod_cli.tasks import TASKS, get_task, sources
from frod_cli.tasks.multiple_choice import detect_schema, normalise_example


def make_task(type_name="seq_cls", seed=0, **kw):
    kw.setdefault("name", "t")
    return get_task(type_name)(task_config(type_name, **kw), seed)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one_step(task, model_name, n=4):
    """load -> model -> encode -> collate -> loss + predictions on the first n train rows."""
    data = task.load_data()
    model, pre = models.load_model(ModelConfig(name_or_path=model_name), task)
    enc = task.encode(data, pre)
    batch = task.collate(pre)([enc["train"][i] for i in range(n)])
    loss = task.loss(model, batch)
    with torch.no_grad():
        preds, refs = task.predict(model, batch)
    return data, model, batch, loss, preds, refs


def test_registry():
    assert {"seq_cls", "image_cls", "multiple_choice"} <= set(TASKS)
    with pytest.raises(ValueError, match=f"unknown task type 'nope'; known: {', '.join(sorted(TASKS))}"):
        get_task("nope")


# ------------------------------------------------------------------------------------------------ splits
def _labelled(n=200, classes=(0.7, 0.2, 0.1)):
    labels = np.repeat(np.arange(len(classes)), [int(n * c) for c in classes])
    feats = datasets.Features({"id": datasets.Value("int64"), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"id": list(range(len(labels))), "label": labels.tolist()}, features=feats)


def _split(raw, seed, **kw):
    return sources.make_splits(raw, task_config("seq_cls", name="t", **kw), seed, stratify_by="label")


def test_carved_splits_are_stratified_deterministic_and_disjoint():
    raw = datasets.DatasetDict(train=_labelled())
    a, b, c = _split(raw, 1), _split(raw, 1), _split(raw, 2)
    ids = {s: set(a[s]["id"]) for s in a}
    assert {s: len(v) for s, v in ids.items()} == {"train": 160, "validation": 20, "test": 20}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert ids["train"] | ids["validation"] | ids["test"] == set(range(200))
    assert all(a[s]["id"] == b[s]["id"] for s in a) and a["test"]["id"] != c["test"]["id"]
    for s in ("validation", "test"):  # 70/20/10 class mix kept in each 20-row split
        assert np.bincount(a[s]["label"], minlength=3).tolist() == [14, 4, 2]
    # The test set does not depend on how much validation is carved.
    assert _split(raw, 1, validation_fraction=0.3)["test"]["id"] == a["test"]["id"]


def test_source_splits_used_and_test_never_validation():
    raw = datasets.DatasetDict(train=_labelled(), test=_labelled(50).map(lambda r: {"id": r["id"] + 1000}))
    out = _split(raw, 0)
    assert out["test"]["id"] == raw["test"]["id"]  # the source's test split, untouched
    assert set(out["validation"]["id"]) <= set(range(200)) and len(out["validation"]) == 20  # carved from train
    with pytest.raises(ValueError, match="model selection would see the test set"):
        _split(raw, 0, validation_split="test", test_split="test")
    with pytest.raises(ValueError, match="model selection needs a validation set"):
        _split(raw, 0, validation_fraction=0.0)
    with pytest.raises(ValueError, match="train split 'training' not found; the source has splits"):
        _split(raw, 0, train_split="training")


def test_subsampling_is_deterministic():
    raw = datasets.DatasetDict(train=_labelled())
    a = _split(raw, 3, max_train_samples=50, max_eval_samples=10)
    b = _split(raw, 3, max_train_samples=50, max_eval_samples=10)
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (50, 10, 10)
    assert a["train"]["id"] == b["train"]["id"] and a["validation"]["id"] == b["validation"]["id"]


# ------------------------------------------------------------------------------------------------ sources
def test_twitter_sentiment_three_classes_no_duplicates():
    raw = sources.load_raw(task_config("seq_cls", name="tw", source="offline", dataset="twitter_sentiment"))
    train = raw["train"]
    assert train.features["label"].names == ["negative", "neutral", "positive"]
    texts = train["text"]
    assert len(set(texts)) == len(texts) > 30000
    assert set(train.unique("label")) == {0, 1, 2}


def test_digits_source_and_unknown_offline_source():
    raw = sources.load_raw(task_config("image_cls", name="d", source="offline", dataset="digits"))
    assert len(raw["train"]) == 1797 and np.asarray(raw["train"][0]["image"]).max() <= 255
    with pytest.raises(ValueError, match="unknown offline source 'nope'; known: arith_rl_tiny, digits, fashion_mnist"):
        sources.load_raw(task_config("image_cls", name="d", source="offline", dataset="nope"))


# ------------------------------------------------------------------------------------------------ seq_cls
def test_seq_cls_local_csv_end_to_end(tmp_path):
    rows = "".join(f"movie {i} was {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    (tmp_path / "train.csv").write_text("sentence,sentiment\n" + rows)
    task = make_task(source="local", data_files={"train": str(tmp_path / "train.csv")}, text_fields=["sentence"],
                     label_field="sentiment", labels=["neg", "pos"], metrics=["accuracy", "f1"])
    data, model, batch, loss, preds, refs = one_step(task, "tiny:bert")
    assert task.model_kwargs()["id2label"] == {0: "neg", 1: "pos"} and model.config.num_labels == 2
    assert data["train"].features["sentiment"].names == ["neg", "pos"]
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert preds.shape == refs.shape == (4,)
    assert set(task.compute_metrics(preds, refs)) == {"accuracy", "f1"}


def test_seq_cls_paired_json_regression(tmp_path):
    rows = [{"s1": f"a man plays {i}", "s2": f"someone plays {i % 5}", "score": float(i % 6)} for i in range(30)]
    task = make_task(source="local", data_files={"train": write_jsonl(tmp_path / "stsb.jsonl", rows)},
                     text_fields=["s1", "s2"], label_field="score", regression=True, metrics=["pearson", "spearmanr"])
    _, model, batch, loss, preds, refs = one_step(task, "tiny:bert")
    assert task.model_kwargs() == {"num_labels": 1, "problem_type": "regression"}
    assert (batch["token_type_ids"] == 1).any()  # the pair reached the tokenizer as a pair
    assert batch["labels"].dtype == torch.float32 and preds.dtype == torch.float32 and preds.shape == (4,)
    assert torch.isfinite(loss) and set(task.compute_metrics(preds, refs)) == {"pearson", "spearmanr"}


def test_seq_cls_labels_inferred_sorted(tmp_path):
    rows = [{"text": f"t{i}", "label": ["neutral", "positive", "negative"][i % 3]} for i in range(30)]
    task = make_task(source="local", data_files={"train": write_jsonl(tmp_path / "d.jsonl", rows)})
    task.load_data()
    assert task.labels == ["negative", "neutral", "positive"]


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals(tmp_path):
    (tmp_path / "ok.csv").write_text("text,label\n" + "".join(f"t{i},{['a', 'b'][i % 2]}\n" for i in range(10)) + "t,c\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    ok = str(tmp_path / "ok.csv")
    cases = [
        (dict(data_files={"train": ok}, text_fields=["sentence"]), r"split 'train' has no column 'sentence'; its columns are \['text', 'label'\]"),
        (dict(data_files={"train": str(tmp_path / "nope.csv")}), "data file for split 'train' not found: .*nope.csv"),
        (dict(data_files={"train": str(tmp_path / "empty.csv")}), "split 'train' is empty"),
        (dict(data_files={"train": ok}, labels=["a", "b"]), r"column 'label' holds label 'c', not one of task.labels \['a', 'b'\]"),
        (dict(data_files={}), "needs task.data_files"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as info:
            make_task(source="local", **kw).load_data()
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ image_cls
def test_image_cls_cifar_schema_parquet_through_tiny_vit(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    imgs[0] = imgs[0].convert("L")  # grayscale must become RGB
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["airplane", "cat"])})
    for split, sl in (("train", slice(0, 16)), ("test", slice(16, 20))):
        datasets.Dataset.from_dict({"img": imgs[sl], "label": [i % 2 for i in range(20)][sl]}, features=feats).to_parquet(str(tmp_path / f"{split}.parquet"))
    task = make_task("image_cls", source="local", image_field="img", image_size=16, validation_fraction=0.25,
                     data_files={"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")})
    data, model, batch, loss, preds, refs = one_step(task, "tiny:vit")
    assert {k: len(v) for k, v in data.items()} == {"train": 12, "validation": 4, "test": 4}
    assert task.labels == ["airplane", "cat"] and model.config.id2label == {0: "airplane", 1: "cat"}
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert torch.isfinite(loss) and preds.shape == refs.shape == (4,)


def test_image_cls_arrays_from_offline_digits():
    task = make_task("image_cls", source="offline", dataset="digits", image_size=8, max_train_samples=20, max_eval_samples=10)
    data, _, batch, loss, preds, _ = one_step(task, "tiny:vit")
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and torch.isfinite(loss) and len(task.labels) == 10


# ------------------------------------------------------------------------------------------------ multiple_choice
def _mc_rows(n=24):
    return [{"question": f"which word {i}?", "choices": ["red apple", "blue", "green leaf tree"][: 2 + i % 2], "label": i % 2} for i in range(n)]


def test_multiple_choice_through_tiny_llama(tmp_path):
    task = make_task("multiple_choice", source="local", max_length=24, data_files={"train": write_jsonl(tmp_path / "mc.jsonl", _mc_rows())})
    data, model, batch, loss, preds, refs = one_step(task, "tiny:llama")
    assert task.model_kwargs() == {} and task.default_modules_to_save == ()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert preds.shape == refs.shape == (4,) and batch["choice_valid"].shape == (4, 3)
    scores = task.scores(model, batch)
    assert torch.isinf(scores[~batch["choice_valid"]]).all() and torch.isfinite(scores[batch["choice_valid"]]).all()
    assert set(task.compute_metrics(preds, refs)) == {"accuracy"}


@pytest.mark.parametrize("family", ["tiny:llama", "tiny:gpt2"])
def test_choice_scores_equal_unpadded_log_probs(tmp_path, family):
    """Left padding + logits_to_keep must give each choice's exact summed log-prob given its prompt."""
    task = make_task("multiple_choice", source="local", max_length=24, data_files={"train": write_jsonl(tmp_path / "mc.jsonl", _mc_rows())})
    data = task.load_data()
    model, tok = models.load_model(ModelConfig(name_or_path=family), task)
    train = task.encode(data, tok)["train"]
    feats = [train[i] for i in range(3)]
    with torch.no_grad():
        got = task.scores(model, task.collate(tok)(feats))
        for b, f in enumerate(feats):
            for k, c in enumerate(f["choice_ids"]):
                ids = torch.tensor([f["prompt_ids"] + c])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                want = logp[torch.arange(len(f["prompt_ids"]) - 1, ids.shape[1] - 1), torch.tensor(c)].sum()
                assert got[b, k].item() == pytest.approx(want.item(), abs=1e-4)


def test_multiple_choice_schemas():
    cfg = task_config("multiple_choice", name="m")
    piqa = {"goal": "open a jar", "sol1": "twist", "sol2": "pull", "label": 1}
    arc = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"}
    arc_digits = {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "1"}
    boolq = {"question": "is it wet", "passage": "Water is wet.", "answer": True}
    expect = [(piqa, "piqa", 1, ["twist", "pull"]), (arc, "arc", 2, ["x", "y", "z"]), (arc_digits, "arc", 0, ["x", "y"]),
              (boolq, "boolq", 1, ["no", "yes"])]
    for ex, schema, label, choices in expect:
        assert detect_schema(list(ex), cfg) == schema
        prompt, got_choices, got_label = normalise_example(ex, schema, cfg)
        assert (got_choices, got_label) == (choices, label) and prompt.endswith("Answer:")
    generic = {"question": "Q?", "choices": ["x", "y", "z"], "label": "B"}
    assert normalise_example(generic, detect_schema(list(generic), cfg), cfg)[2] == 1


def test_multiple_choice_refusals(tmp_path):
    bad = [{"question": "q", "choices": ["a", "b"], "label": 5}] * 10
    with pytest.raises(ValueError, match=r"answer 5 names none of the 2 choices"):
        make_task("multiple_choice", source="local", data_files={"train": write_jsonl(tmp_path / "bad.jsonl", bad)}).load_data()
    other = [{"text": "q", "label": 0}] * 10
    with pytest.raises(ValueError, match=r"no column 'question', 'choices' .*its columns are \['label', 'text'\]"):
        make_task("multiple_choice", source="local", data_files={"train": write_jsonl(tmp_path / "o.jsonl", other)}).load_data()


def test_hidden_test_labels_are_replaced_by_a_carved_test_split(tmp_path):
    """GLUE ships test labels as -1: that split cannot be scored, so test is carved out of train."""
    rows = "".join(f"s{i},{i % 2}\n" for i in range(40))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f"u{i},-1\n" for i in range(10)))
    task = make_task(source="local", data_files={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")})
    data = task.load_data()
    assert {k: len(v) for k, v in data.items()} == {"train": 32, "validation": 4, "test": 4}
    assert all(t.startswith("s") for t in data["test"]["text"]) and task.labels == ["0", "1"]


def test_image_cls_imagefolder(tmp_path):
    for split, n in (("train", 6), ("validation", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    task = make_task("image_cls", source="local", image_size=8, test_fraction=0.0,
                     data_files={"train": str(tmp_path / "train"), "validation": str(tmp_path / "validation")})
    data, _, batch, loss, _, _ = one_step(task, "tiny:vit")
    assert task.labels == ["cat", "dog"] and (len(data["train"]), len(data["validation"])) == (12, 4)
    assert "test" not in data and batch["pixel_values"].shape == (4, 3, 8, 8) and torch.isfinite(loss)
