"""train.fsdp (frod_cli/training/distributed.py): FSDP2 through Accelerate, on CPU over gloo here.

Two processes that shard the frozen weights train exactly as one process with the same global batch:
a tiny BERT classifier (debug=default) and a tiny causal LLaMA (recipe=sft_smoke: loss, perplexity and
greedy generation in every evaluation). Plus the refusals of what sharding cannot do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from omegaconf import open_dict

from frod_cli import FrodCliError
from frod_cli.cli import run_verb
from frod_cli.training import checkpoint as ck
from frod_cli.training import distributed as D

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]
TIMING = {"samples_per_s", "elapsed_s", "eta_s", "peak_memory_mb", "current_memory_mb"}


def rows(run: Path) -> List[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_values(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(ck.latest_checkpoint(str(run))) / "trainable.safetensors"))


def train_two_processes(work: Path, args: List[str]) -> Tuple[Path, str]:
    """torchrun --standalone --nproc_per_node 2 frod train <args> in `work`; (its one run dir, its output)."""
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "frod_cli.cli", "train", *args]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    runs = [p for p in (work / "runs").rglob("*") if p.is_dir() and p.parent.parent == work / "runs"]
    assert len(runs) == 1, runs  # one run directory, written by rank 0
    return runs[0], r.stdout + r.stderr


def assert_same_training(one: Path, two: Path, stderr: str, loss_rtol: float = 1e-3) -> None:
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["num_processes"] == 1 and m2["num_processes"] == 2
    # the frozen weights were sharded: each rank held half of them
    assert "sharded elements on this rank (50.0%)" in stderr, stderr[-3000:]
    # the FRoD basis and pattern (and the initial trainables) are the same on both ranks and in one process
    assert len(m2["rank_fingerprints"]) == 2 and set(m2["rank_fingerprints"]) == set(m1["rank_fingerprints"])
    assert m2["method_details"].get("accumulate", "micro_batch") == "micro_batch"
    r1, r2 = rows(one), rows(two)
    assert [(r.get("step"), r.get("split")) for r in r1] == [(r.get("step"), r.get("split")) for r in r2]
    for a, b in zip(r1, r2):
        for k, v in a.items():
            if isinstance(v, float) and k not in ("epoch",):
                assert b[k] == pytest.approx(v, rel=loss_rtol, abs=1e-6), (k, a, b)
    for split in ("validation", "test"):
        for k, v in m1[split].items():
            assert m2[split][k] == pytest.approx(v, rel=loss_rtol, abs=1e-6), (split, k)
    a, b = final_values(one), final_values(two)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)
    # merged/ was rebuilt by rank 0 from the shards' base and the adapter; it matches the sharded model
    assert (two / "merged" / "config.json").is_file() and (two / "adapter").is_dir()
    assert m2["merge_max_abs_diff"] is not None and m2["merge_max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["frod", "lora"])
def test_fsdp_two_processes_match_one_bert(tmp_path, debug_args, method):
    """debug=default (tiny BERT, FRoD or LoRA on query/key/value/dense + the classifier head): the
    embeddings and BertLayer units sharded, trainables whole; the same losses, metrics and final values as
    one process, with gradient accumulation on the sharded side. (LoRA: PEFT's save_pretrained reads the
    state dict on rank 0 alone, which must not leave the ranks' shards in different states.)"""
    args = [*debug_args, f"method={method}", "train.cpu=true", "train.keep_checkpoints=true",
            "train.fsdp.enabled=true", *NO_DROPOUT]
    one = tmp_path / "one"
    code, _ = run_verb("train", [*args, "train.batch_size=16", f"hydra.run.dir={one}"])  # fsdp ignored: 1 process
    assert code == 0
    # 2 processes x 4 examples x 2 micro-batches: the first backward of each window runs under no_sync
    two, stderr = train_two_processes(tmp_path / "two", [*args, "train.batch_size=4", "train.grad_accum=2"])
    assert_same_training(one, two, stderr)
    assert "units: BertLayer" in stderr  # BertEmbeddings (in _no_split_modules) left to Accelerate's embedding unit


@pytest.mark.slow
def test_fsdp_two_processes_match_one_causal_llama(tmp_path):
    """recipe=sft_smoke (tiny LLaMA, causal_lm): validation loss and perplexity of every evaluation (whose
    greedy generation runs on the sharded model), and the final values equal one process's; the sharded
    side recomputes its decoder layers in the backward (gradient checkpointing)."""
    args = ["recipe=sft_smoke", "train.cpu=true", "train.keep_checkpoints=true", "train.progress=false",
            "train.fsdp.enabled=true"]
    one = tmp_path / "one"
    code, _ = run_verb("train", [*args, "train.batch_size=8", f"hydra.run.dir={one}"])
    assert code == 0
    two, stderr = train_two_processes(tmp_path / "two", [*args, "train.batch_size=4",
                                                         "train.gradient_checkpointing=true"])
    assert_same_training(one, two, stderr)
    assert "units: LlamaDecoderLayer" in stderr
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m2["validation"]["loss"] == pytest.approx(m1["validation"]["loss"], rel=1e-3)
    # greedy generation on the sharded model (each rank its share, every step gathering weights) gives
    # one process's predictions
    p1 = [json.loads(line) for line in (one / "predictions.jsonl").read_text().splitlines()]
    p2 = [json.loads(line) for line in (two / "predictions.jsonl").read_text().splitlines()]
    assert p1 and [(r["split"], r["index"], r["prediction"]) for r in p2] == \
        [(r["split"], r["index"], r["prediction"]) for r in p1]


# ---------------------------------------------------------------------------------------------------
# Refusals and choices, before any work (no process group needed)
# ---------------------------------------------------------------------------------------------------
def fsdp_cfg(cfg, **fsdp):
    with open_dict(cfg):
        cfg.train.fsdp.enabled = True
        for k, v in fsdp.items():
            cfg.train.fsdp[k] = v
    return cfg


def test_fsdp_schema_has_its_keys_and_refuses_others(cfg_debug, debug_args, capsys):
    fc = cfg_debug.train.fsdp
    assert (fc.enabled, fc.wrap, fc.reshard_after_forward, fc.cpu_offload, fc.state_dict_type, fc.version) == \
        (False, None, True, False, "FULL_STATE_DICT", 2)
    code, _ = run_verb("train", [*debug_args, "train.fsdp.shard_everything=true"])
    assert code == 2
    assert "shard_everything" in capsys.readouterr().err


def test_one_process_trains_unsharded(cfg_debug, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.check_fsdp_config(fsdp_cfg(cfg_debug)) is False


@pytest.mark.parametrize("change, message", [
    ({"version": 1}, "only FSDP2"),
    ({"state_dict_type": "LOCAL_STATE_DICT"}, "state_dict_type"),
])
def test_fsdp_settings_are_checked(cfg_debug, monkeypatch, change, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FrodCliError, match=message):
        D.check_fsdp_config(fsdp_cfg(cfg_debug, **change))


def test_window_accumulation_is_refused_and_auto_takes_micro_batch(cfg_debug, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = fsdp_cfg(cfg_debug)
    with open_dict(cfg):
        cfg.method.accumulate = "window"
    with pytest.raises(FrodCliError, match="accumulate=window"):
        D.check_fsdp_config(cfg)
    cfg.method.accumulate = "auto"
    assert D.check_fsdp_config(cfg) is True
    assert cfg.method.accumulate == "micro_batch"


def test_full_fine_tuning_is_refused_under_fsdp(monkeypatch):
    from conftest import compose_train

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_train(["debug=default", "method=full", "train.fsdp.enabled=true"])
    with pytest.raises(FrodCliError, match="trains every weight"):
        D.check_fsdp_config(cfg)


def test_wrap_classes_are_checked_against_the_model():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    assert "BertEmbeddings" in D.embedding_holders(model) and "BertLayer" not in D.embedding_holders(model)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    with pytest.raises(FrodCliError, match="no module of class LlamaDecoderLayer"):
        D.set_model_policy(plugin, model, ["LlamaDecoderLayer"], 2, False)
    with pytest.raises(FrodCliError, match="holds the input embeddings"):
        D.set_model_policy(plugin, model, ["BertEmbeddings", "BertLayer"], 2, False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    replicated = D.set_model_policy(plugin, model, None, 2, False)
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer"]
    assert replicated == [model.classifier.weight]
    assert list(plugin.ignored_modules[0].parameters()) == [model.classifier.weight]


MIXED_PRECISION_SCRIPT = r'''
import json, sys, torch
from types import SimpleNamespace
from transformers import BertConfig, BertForSequenceClassification
from frod_cli.frod import FrodConfig, apply_frod
from frod_cli.training import distributed as D

torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
apply_frod(model, FrodConfig(target_modules=["query", "value"], sparse_rate=0.05, modules_to_save=["classifier"]))
fc = SimpleNamespace(enabled=True, wrap=None, reshard_after_forward=True, cpu_offload=False,
                     state_dict_type="FULL_STATE_DICT", version=2)
acc = D.make_accelerator(fc, mixed_precision=sys.argv[1], cpu=True)
acc.set_model_policy(model, None)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, opt = acc.prepare(model, opt)
ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(acc.process_index))
labels = torch.tensor([0, 1, 1, 0])
out = model(input_ids=ids, labels=labels)
acc.backward(out.loss)
with open(f"result-{sys.argv[1]}-{acc.process_index}.json", "w") as f:
    json.dump([float(out.loss), str(out.logits.dtype), str(model.classifier.weight.grad.dtype),
               acc.state.fsdp_plugin.mixed_precision_policy is not None], f)
del model, opt, out  # the sharded model holds the process group: released by the shutdown, as frod train does
D.shutdown(acc)
'''


@pytest.mark.slow
def test_fsdp_mixed_precision_path(tmp_path):
    """train.mixed_precision=bf16 under FSDP (a GPU setting; the recipe turns it off on CPU): Accelerate's
    MixedPrecisionPolicy gathers the sharded weights in bf16, the forward autocasts as under DDP, so the
    float32 head FSDP leaves whole meets bf16 activations without a dtype error, and the outputs are
    float32. Driven through the accelerator directly, on CPU."""
    script = tmp_path / "mp.py"
    script.write_text(MIXED_PRECISION_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for mode in ("no", "bf16"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), mode], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        results[mode] = [json.loads((tmp_path / f"result-{mode}-{rank}.json").read_text()) for rank in (0, 1)]
    for (loss, logits, grad, policy), (loss32, logits32, _, policy32) in zip(results["bf16"], results["no"]):
        assert (logits, grad, policy, logits32, policy32) == ("torch.float32", "torch.float32", True,
                                                              "torch.float32", False)
        assert loss == pytest.approx(loss32, rel=2e-2)
