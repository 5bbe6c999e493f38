"""Frozen weights in bfloat16 (model.dtype=bfloat16) with float32 trainables and float32 optimizer state,
end to end on CPU: the loss tracks the float32 run, FRoD's values, the trained head and AdamW's moments
are float32 in the checkpoint, merged/ is a bfloat16 model, and metrics.json says what the run computed in.

The runs are debug=default's tiny BERT on 160 rows of a local CSV (the packaged data set's loading was most of
their time). Nothing here needs bfloat16 to be fast: with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, how a
CPU without native bfloat16 computes) these tests took as long as with it (docs/PERFORMANCE.md, "Precision")."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frod_cli.cli import run_verb
from frod_cli.training import checkpoint as ck

NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]


def losses(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "split" not in r}


def checkpoint_tensors(run: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(ck.latest_checkpoint(str(run))) / name))


def small_data(directory: Path) -> list:
    """A 3-class CSV of 160 rows: 32 for test and 32 for validation are carved out, 64 of the rest trained on."""
    import random

    rng = random.Random(0)
    words = "good bad fine awful great poor nice terrible plain odd".split()
    rows = ["text,label"] + [" ".join(rng.choice(words) for _ in range(8)) + f",{('neg', 'neu', 'pos')[i % 3]}"
                             for i in range(160)]
    (directory / "data.csv").write_text("\n".join(rows) + "\n")
    return ["task=local_text", f"task.data_files.train={directory / 'data.csv'}", "task.validation_fraction=0.2",
            "task.test_fraction=0.2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same debug=default run with float32 and with bfloat16 frozen weights; and bfloat16 with every
    FRoD layer in project order (debug=default's micro-batches otherwise materialize dW everywhere)."""
    from conftest import DEBUG

    data = small_data(tmp_path_factory.mktemp("data"))
    out = {}
    for key, extra in (("float32", []), ("bfloat16", []), ("bfloat16_project", ["method.frod_mode=project"])):
        run = tmp_path_factory.mktemp(key) / "run"
        dtype = key.split("_")[0]
        code, _ = run_verb("train", [*DEBUG, *data, *NO_DROPOUT, "train.cpu=true", "train.keep_checkpoints=true",
                                     "train.log_every=1", f"model.dtype={dtype}", *extra, f"hydra.run.dir={run}"])
        assert code == 0
        out[key] = run
    return out


@pytest.mark.slow
@pytest.mark.parametrize("key", ["bfloat16", "bfloat16_project"])
def test_bf16_loss_tracks_float32(runs, key):
    f32, b16 = losses(runs["float32"]), losses(runs[key])
    assert sorted(f32) == sorted(b16) == [1, 2, 3, 4]
    for step in f32:
        assert b16[step] == pytest.approx(f32[step], rel=0.03), (step, f32[step], b16[step])


@pytest.mark.slow
def test_bf16_trainables_and_adamw_state_are_float32(runs):
    trainable = checkpoint_tensors(runs["bfloat16"], "trainable.safetensors")
    assert any(k.endswith("frod_lambda") for k in trainable) and any(k.endswith("frod_s") for k in trainable)
    assert any(k.startswith("classifier.") for k in trainable)  # the head trains in float32 too
    assert {k: v.dtype for k, v in trainable.items() if v.dtype != torch.float32} == {}
    optimizer = checkpoint_tensors(runs["bfloat16"], "optimizer.safetensors")
    moments = {k: v for k, v in optimizer.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert len(moments) == 2 * len(trainable)
    assert {k: v.dtype for k, v in moments.items() if v.dtype != torch.float32} == {}


@pytest.mark.slow
def test_bf16_merged_model_is_bfloat16(runs):
    from safetensors.torch import load_file

    run = runs["bfloat16"]
    merged = load_file(str(run / "merged" / "model.safetensors"))
    assert merged and {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.bfloat16}
    assert not any("frod" in k for k in merged)  # a plain BERT
    assert json.loads((run / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["merge_max_abs_diff"] is not None and metrics["merge_max_abs_diff"] < 1e-2
    assert (metrics["compute_dtype"], metrics["cpu_capability"]) == ("bfloat16", torch.backends.cpu.get_cpu_capability())
    assert json.loads((runs["float32"] / "metrics.json").read_text())["compute_dtype"] == "float32"
    # merged/ loads back and evaluates like the trained model did on test
    code, _ = run_verb("eval", [f"path={run}", "cpu=true"])
    assert code == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1 / 32 + 1e-9)
