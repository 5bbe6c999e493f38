"""End to end, in-process, tiny models, temp dirs: train -> run directory -> eval -> merge; a
two-job sweep with its summary; the vit_cifar smoke run (tiny ViT, local images in CIFAR's schema)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from frod_cli.cli import main, run_verb

pytestmark = pytest.mark.slow

from conftest import DEBUG, train_run  # noqa: E402  (tests/ is on sys.path under pytest)

TINY_TEXT = DEBUG
RUN_FILES = [".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "metrics.json", "adapter",
             "merged/config.json", "merged/model.safetensors", "loss.png"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return train_run(tmp_path_factory, "run", TINY_TEXT)


def test_run_directory(text_run):
    run, value = text_run
    for f in RUN_FILES:
        assert (run / f).exists(), f
    m = json.loads((run / "metrics.json").read_text())
    for key in ("validation", "test", "trainable_params", "trainable_percent", "wall_time_s", "objective_value"):
        assert key in m, key
    assert 0 < m["trainable_percent"] < 100
    assert value == pytest.approx(m["objective_value"])  # what the Optuna sweeper receives
    assert m["merge_max_abs_diff"] < 1e-5
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    logs = [l for l in lines if "loss" in l]
    assert logs and {"step", "loss", "lr", "samples_per_s", "peak_memory_mb", "current_memory_mb"} <= set(logs[0])
    assert any(l.get("split") == "validation" for l in lines)
    # memory: a peak over training (it is at least every amount logged while training), named by its method
    assert m["peak_memory_mb"] >= max(l["current_memory_mb"] for l in logs) > 0
    assert [l["peak_memory_mb"] for l in logs] == sorted(l["peak_memory_mb"] for l in logs)
    assert "from the first training step to the last" in m["peak_memory_method"]


def test_merged_loads_with_plain_transformers(text_run):
    """merged/ needs no frod import and gives the adapted model's logits (base + adapter)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from frod_cli.runs import load_run_config
    from frod_cli.methods import build_method
    from frod_cli.training.builders import build_task, load_model

    run, _ = text_run
    plain = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
    tok = AutoTokenizer.from_pretrained(run / "merged")
    cfg = load_run_config(str(run))
    task = build_task(cfg.task, cfg.train.seed)
    task.load_data()
    torch.manual_seed(cfg.train.seed)
    base, _ = load_model(cfg.model, task)
    adapted = build_method(cfg.method, task, cfg.model).load_adapter(base, str(run / "adapter")).eval()
    batch = tok(["what a great day", "this is terrible", "meh"], padding=True, return_tensors="pt")
    with torch.no_grad():
        diff = (plain(**batch).logits - adapted(**batch).logits).abs().max().item()
    assert diff < 1e-5


def test_eval_reproduces_training_metrics(text_run, tmp_path):
    run, _ = text_run
    out = tmp_path / "eval.json"
    assert main(["eval", f"path={run}", f"output={out}"]) == 0
    ev = json.loads(out.read_text())
    m = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):
        for k, v in m[split].items():
            assert ev[split][k] == pytest.approx(v, abs=1e-6), (split, k)
    # base model + adapter gives the same numbers; a relative output= lies in the run directory
    assert main(["eval", f"path={run}", "use_adapter=true", "output=eval_adapter.json"]) == 0
    ev2 = json.loads((run / "eval_adapter.json").read_text())
    (run / "eval_adapter.json").unlink()
    assert ev2["test"]["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=1e-6)
    # a merged checkpoint plus a task
    out3 = tmp_path / "eval_ckpt.json"
    assert main(["eval", f"path={run / 'merged'}", "task=twitter_sentiment", "task.max_train_samples=64",
                 "task.max_eval_samples=32", "task.max_length=24", f"output={out3}"]) == 0
    ev3 = json.loads(out3.read_text())
    assert ev3["test"]["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=1e-6)


def test_merge_rebuilds_merged(text_run, tmp_path, capsys):
    run, _ = text_run
    out = tmp_path / "merged"
    assert main(["merge", f"run={run}", f"output={out}"]) == 0
    assert "largest" in capsys.readouterr().out
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    report = json.loads((out / "merge.json").read_text())  # the report goes with the output it describes
    assert report["max_abs_diff"] < 1e-5 and not (run / "merge.json").exists()


def test_two_job_sweep_summary(tmp_path):
    sweep = tmp_path / "sweep"
    code, _ = run_verb("train", ["-m", "method=frod,lora", *TINY_TEXT, "train.save_merged=false",
                                 f"hydra.sweep.dir={sweep}"])
    assert code == 0
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").exists()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["frod", "lora"]
    assert "method=frod" in rows[0]["overrides"]
    for col in ("validation_accuracy", "test_accuracy", "trainable_percent", "samples_per_s", "train_time_s",
                "wall_time_s"):
        assert rows[0][col] != "", col
    assert "| job |" in (sweep / "summary.md").read_text()
    assert (sweep / "loss_curves.png").stat().st_size > 0


def _cifar_like_parquet(path: Path, n: int = 40) -> Path:
    import datasets
    import numpy as np
    from PIL import Image

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"img": imgs, "label": [i % 10 for i in range(n)]}, features=feats)
    ds.to_parquet(str(path))
    return path


def test_vit_cifar_smoke(tmp_path):
    """recipe=vit_cifar's code path with a tiny ViT and a local image set in CIFAR's schema."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    data = _cifar_like_parquet(tmp_path / "train.parquet")
    run = tmp_path / "vit"
    code, _ = run_verb("train", ["recipe=vit_cifar_smoke", f"task.data_files.train={data}",
                                 "train.progress=false", f"hydra.run.dir={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == "frod" and m["steps"] == 4 and "accuracy" in m["validation"]
    assert m["merge_max_abs_diff"] < 1e-5
    AutoModelForImageClassification.from_pretrained(run / "merged")
    AutoImageProcessor.from_pretrained(run / "merged")


def test_recipe_class_on_the_composed_debug_config(cfg_debug):
    """The recipe's own steps on the session's composed config: TrainState after training holds what
    state.json will hold, and finalize returns the best validation objective it wrote."""
    from frod_cli.training import FinetuneRecipe
    from frod_cli.training.state import TrainState

    recipe = FinetuneRecipe(cfg_debug, cfg_debug.output_dir)
    recipe.setup()
    recipe.train()
    st = recipe.state
    assert (st.step, st.total_steps, st.last_eval_step) == (4, 4, 4)
    assert TrainState.from_dict(st.to_dict()) == st
    value = recipe.finalize()
    m = json.loads((Path(cfg_debug.output_dir) / "metrics.json").read_text())
    assert value == pytest.approx(m["objective_value"]) and m["best_step"] == st.best_step


def test_target_modules_suffix_with_a_dot_trains_exactly_those_layers(tmp_path):
    """`[attention.output.dense]` is a suffix (PEFT's rule): FRoD adapts the attention-output layers only,
    so the trainable count is theirs (n + floor(sparse_rate n^2) each) plus the classifier's."""
    import math

    from frod_cli.frod import frod_layers
    from frod_cli.training.builders import load_trained

    run = tmp_path / "att"
    code, _ = run_verb("train", [*DEBUG, "method.target_modules=[attention.output.dense]", "train.max_steps=1",
                                 "train.save_merged=false", f"hydra.run.dir={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    trained = load_trained(str(run), use_adapter=True, load_data=True)
    model, cfg = trained.model, trained.run
    layers = dict(frod_layers(model))
    assert layers and all(n.endswith(".attention.output.dense") for n in layers), sorted(layers)
    assert len(layers) == model.config.num_hidden_layers
    rate = float(cfg.method.sparse_rate)
    head = sum(p.numel() for p in model.classifier.parameters())
    expected = sum(l.in_features + math.floor(rate * l.in_features ** 2) for l in layers.values()) + head
    assert m["trainable_params"] == expected


def test_a_batch_larger_than_the_data_is_clamped_and_throughput_counts_real_examples(tmp_path, capsys, monkeypatch):
    """debug=default trains on 64 examples: train.batch_size=1000 becomes 64 with a warning, and samples/s
    counts the 64 examples of each step (not 1000) over the training time only: an evaluation made to take 3 s
    is in evaluation_time_s, not in train_time_s."""
    import time

    from frod_cli.training.evaluation import Evaluator

    real = Evaluator.split
    monkeypatch.setattr(Evaluator, "split", lambda self, model, split: time.sleep(3) or real(self, model, split))
    run = tmp_path / "run"
    code, _ = run_verb("train", [*TINY_TEXT, "train.batch_size=1000", "train.max_steps=3", "train.eval_every=3",
                                 "train.save_merged=false", f"hydra.run.dir={run}"])
    assert code == 0
    assert "train.batch_size=1000 is larger than the training split (64 examples): batches of 64" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["samples_per_s"] * m["train_time_s"] == pytest.approx(3 * 64, rel=1e-6)
    assert m["evaluation_time_s"] >= 3 > m["train_time_s"]
