"""train.fsdp (frod_cli/training/distributed.py, sharded.py, rank0.py): FSDP2 through Accelerate, on CPU over gloo.

Two processes train exactly as one process with the same global batch, in one launch of several runs
(tests/fsdp_runs.py): FRoD on a tiny BERT classifier (debug=default), with rank 1 starting from the meta device
(train.fsdp.load_on_rank0, the default) and again with both ranks loading (the two runs are identical); method=full
with its trainables and AdamW state sharded, and a resume of it from a checkpoint's shard files; FRoD and QLoRA on
an NF4 base (recipe=qfrod_smoke); a tiny causal LLaMA (recipe=sft_smoke: loss, perplexity and greedy generation in
every evaluation, gradient checkpointing on the sharded side). FRoD's runs accumulate 2 micro-batches per step on
the sharded side, in accumulation windows over the shards; the same launch compares FRoD's gradients after a window
over the shards with FSDP's per-micro-batch ones and one process's window (tests/fsdp_window_grads.py). Plus the
refusals of what sharding cannot do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from omegaconf import open_dict

from frod_cli import FrodCliError
from frod_cli.cli import run_verb
from frod_cli.training import checkpoint as ck
from frod_cli.training import distributed as D
from fsdp_runs import launch

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]
TIMING = {"samples_per_s", "elapsed_s", "eta_s", "peak_memory_mb", "current_memory_mb"}
COMMON = ["train.cpu=true", "train.keep_checkpoints=true", "train.progress=false", "train.fsdp.enabled=true"]
BERT = ["debug=default", *NO_DROPOUT, *COMMON]
# causal LMs: greedy generation on 4 examples of each split (not 16): both sides of each comparison alike
GENERATE = ["task.generation.max_examples=4", "task.max_eval_samples=16"]
NF4 = ["recipe=qfrod_smoke", "train.max_steps=2", "train.eval_every=2", *GENERATE, *COMMON]
SFT = ["recipe=sft_smoke", "train.max_steps=4", "train.eval_every=2", *GENERATE, *COMMON]  # 2 evaluations, 2 windows each
# name: (arguments of both runs, of the one-process run only, of the two-process run only)
RUNS = {
    "frod": (BERT, ["train.batch_size=16"], ["train.batch_size=4", "train.grad_accum=2"]),
    "full": ([*BERT, "method=full"], ["train.batch_size=16"], ["train.batch_size=8"]),
    "nf4_frod": (NF4, ["train.batch_size=8"], ["train.batch_size=4"]),
    "nf4_qlora": ([*NF4, "method=lora"], ["train.batch_size=8"], ["train.batch_size=4"]),
    "sft": (SFT, ["train.batch_size=8"], ["train.batch_size=2", "train.grad_accum=2",
                                          "train.gradient_checkpointing=true"]),
}
# the runs whose sharded side accumulates 2 micro-batches in FRoD's windows over the shards (method.accumulate=auto)
WINDOWED = ("frod", "sft")


def rows(run: Path) -> List[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_values(run: Path) -> Dict[str, torch.Tensor]:
    """The last checkpoint's trainables, whole: rank 0's file plus, for sharded ones, every process's shard in rank
    order (FSDP's Shard(0) chunks, read back from the step directory's shards/)."""
    from safetensors.torch import load_file

    step = Path(ck.latest_checkpoint(str(run)))
    values = load_file(str(step / "trainable.safetensors"))
    pieces = [load_file(str(f)) for f in sorted((step / "shards").glob("rank-*.trainable.safetensors"))]
    for name in pieces[0] if pieces else []:
        values[name] = torch.cat([p[name] for p in pieces])
    return values


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One launch of every two-process run (and the loaded twin of `frod`, a resume of `full`, and the gradients of
    accumulation windows over the shards: tests/fsdp_window_grads.py): their work dir."""
    work = tmp_path_factory.mktemp("fsdp-two")
    runs = [{"name": name, "args": [*both, *mine]} for name, (both, _, mine) in RUNS.items()]
    frod = RUNS["frod"]
    runs.append({"name": "frod_loaded", "args": [*frod[0], *frod[2], "train.fsdp.load_on_rank0=false"]})
    runs.append({"name": "full_resumed", "args": [*RUNS["full"][0], *RUNS["full"][2]], "resume_of": "full",
                 "resume_cut": 2})
    runs.append({"name": "window_grads", "script": "fsdp_window_grads"})  # FRoD's gradients in windows over shards
    launch(work, runs)
    return work


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The one-process twin of every run (train.fsdp.enabled is ignored with one process)."""
    work = tmp_path_factory.mktemp("fsdp-one")
    for name, (both, mine, _) in RUNS.items():
        code, _ = run_verb("train", [*both, *mine, f"hydra.run.dir={work / name}"])
        assert code == 0, name
    return work


def assert_same_training(one: Path, two: Path, loss_rtol: float = 1e-3, atol: float = 1e-4,
                         accumulate: str = "micro_batch") -> None:
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["num_processes"] == 1 and m2["num_processes"] == 2
    # the weights were sharded (the frozen ones, or every one for method=full): each rank held half of them
    assert "sharded elements on this rank (50.0%)" in (two / "train.log").read_text()
    # the FRoD basis and pattern and the initial trainables (all weights, gathered, for method=full) are the same
    # on both ranks and in one process
    assert len(m2["rank_fingerprints"]) == 2 and set(m2["rank_fingerprints"]) == set(m1["rank_fingerprints"])
    details = m2["method_details"]
    assert details.get("accumulate", "micro_batch") == accumulate
    if accumulate == "window":  # accumulation windows over the sharded weights: every FRoD layer took them
        taken, _, layers = details["window_layers"].partition(" of ")
        assert taken == layers and int(layers) > 0, details
        assert "FRoD layers took it" in (two / "train.log").read_text()
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
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0)
    # merged/ was rebuilt by rank 0 from the base and the adapter (gathered for method=full); it matches the
    # sharded model
    assert (two / "merged" / "config.json").is_file() and (two / "adapter").is_dir()
    assert m2["merge_max_abs_diff"] is not None and m2["merge_max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one(one, two, name):
    """FRoD (meta-loaded rank 1, gradient accumulation in windows over the shards, each micro-batch's backward under
    no_sync), method=full (ZeRO-3), FRoD and QLoRA on an NF4 base, the causal LLaMA (windows over the shards whose
    backward recomputes the layers with W + dW gathered from them: gradient checkpointing): the same losses,
    metrics and final values as one process. Tolerance: 1e-3 relative on losses and metrics, 1e-4 absolute on the
    trained values (the gradient averages add in another order)."""
    assert_same_training(one / name, two / name, accumulate="window" if name in WINDOWED else "micro_batch")
    units = "BertLayer" if name in ("frod", "full") else "LlamaDecoderLayer"
    # BertEmbeddings (in _no_split_modules) is left to Accelerate's embedding unit
    assert f"(units: {units})" in (two / name / "train.log").read_text()
    if name == "sft":  # greedy generation on the sharded model (each rank its share, every step gathering
        # weights) gives one process's predictions
        p1, p2 = ([json.loads(line) for line in (r / "predictions.jsonl").read_text().splitlines()]
                  for r in (one / name, two / name))
        assert p1 and [(r["split"], r["index"], r["prediction"]) for r in p2] == \
            [(r["split"], r["index"], r["prediction"]) for r in p1]


@pytest.mark.slow
def test_meta_loaded_run_equals_fully_loaded(two):
    """train.fsdp.load_on_rank0 (rank 1 built on meta, weights and FRoD bases from rank 0) trains bit for bit as
    a run where both ranks load the base."""
    meta, loaded = two / "frod", two / "frod_loaded"
    assert "load_on_rank0" not in (meta / ".hydra" / "overrides.yaml").read_text()
    assert rows(meta) == rows(loaded)
    a, b = final_values(meta), final_values(loaded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (meta, loaded))
    assert m1["rank_fingerprints"] == m2["rank_fingerprints"] and m1["test"] == m2["test"]


@pytest.mark.slow
def test_full_fine_tuning_sharded_checkpoints_resume(one, two):
    """method=full under FSDP writes each process's shard of the trainables, of the best values and of AdamW's
    state into the step directory; a run cut after step 2 resumes from them and ends exactly where the
    uninterrupted run did. adapter/ holds the whole model, gathered: one process's adapter."""
    from safetensors.torch import load_file

    full, resumed = two / "full", two / "full_resumed"
    step = Path(ck.latest_checkpoint(str(full)))
    shards = sorted(p.name for p in (step / "shards").iterdir())
    assert shards == ["layout.json"] + [f"rank-0000{r}-of-00002.{w}.safetensors" for r in (0, 1)
                                         for w in ("best", "optimizer", "trainable")]
    assert load_file(str(step / "trainable.safetensors")) == {}  # every trainable is sharded
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"].endswith("step-00000002")
    assert rows(resumed) == rows(full)
    a, b = final_values(full), final_values(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    whole, unsharded = (load_file(str(r / "adapter" / "model.safetensors")) for r in (full, one / "full"))
    assert set(whole) == set(unsharded)
    for k in unsharded:
        torch.testing.assert_close(whole[k], unsharded[k], atol=1e-4, rtol=0)


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
    assert (fc.enabled, fc.wrap, fc.reshard_after_forward, fc.cpu_offload, fc.state_dict_type, fc.version,
            fc.load_on_rank0) == (False, None, True, False, "FULL_STATE_DICT", 2, True)
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


def saved_grads(out: Path, tag: str, variant: str, rank: int) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"grads-{tag}-{variant}-{rank}.safetensors"))


def relative_error(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    """|got - ref| / |ref| over the tensors of `ref`, concatenated."""
    a, b = torch.cat([got[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow
def test_sharded_window_grads_equal_micro_batch_and_unsharded(two):
    """In the one launch (tests/fsdp_window_grads.py: a tiny LLaMA with uneven shards, every layer windowed, U
    recomputed from the shard's rows or stored): lambda's and S's gradients after a window over FSDP-sharded
    weights, averaged over the ranks, equal FSDP's per-micro-batch ones and one process's window over all the data
    (float32, 1e-5 relative per tensor), with gradient checkpointing and with the gathered weights kept from the
    forward to the backward (reshard_after_forward=False) too; every sharded weight is back bit for bit and frozen;
    each rank held one shard of W and of G per layer, window_buffer_bytes' figure. Under bf16 mixed precision
    (FSDP gathering and reducing in bf16, as Accelerate sets it) the window's error against float32 is measured."""
    out = two / "window_grads"
    for tag in ("recomputed", "stored"):
        ref = saved_grads(out, tag, "one", 0)
        variants = ["one_window", "fsdp", "fsdp_window"]
        if tag == "recomputed":
            variants += ["fsdp_window_checkpointing", "fsdp_window_kept"]
        for variant in variants:
            for rank in (0, 1):
                got = saved_grads(out, tag, variant, rank)
                assert got.keys() == ref.keys()
                for key in ref:
                    assert got[key].dtype == torch.float32
                    assert relative_error({key: got[key]}, {key: ref[key]}) <= 1e-5, (tag, variant, rank, key)
    ref = saved_grads(out, "recomputed", "one", 0)
    window_bf16 = relative_error(saved_grads(out, "recomputed", "fsdp_window_bf16", 0), ref)
    micro_batch_bf16 = relative_error(saved_grads(out, "recomputed", "fsdp_bf16", 0), ref)
    print(f"bf16 mixed precision, relative error against float32: window {window_bf16:.2e}, "
          f"per micro-batch {micro_batch_bf16:.2e}")
    assert window_bf16 < 2e-2 and window_bf16 < micro_batch_bf16
    for rank in (0, 1):
        info = json.loads((out / f"rank-{rank}.json").read_text())
        for key, v in info.items():
            assert v["weights_restored"] and v["weights_frozen"], key
            if "window" in key:
                assert v["windowed"] == v["layers"] == 14 and v["held_after"] == 0, key
                # one shard of W (float32) and of G per layer: about half the unsharded window's buffers; rank 0
                # holds the larger share of an uneven split, the figure window_buffer_bytes plans with
                assert (v["held"] == v["planned"]) if rank == 0 else (v["held"] < v["planned"]), key
                assert 0.45 < v["planned"] / v["unsharded"] <= 0.55, key


@pytest.mark.parametrize("accumulate", ["window", "auto", "micro_batch"])
def test_accumulation_windows_are_kept_under_fsdp(cfg_debug, monkeypatch, accumulate):
    """Windows go into the shards (frod/accumulate.py): train.fsdp leaves method.accumulate as given."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = fsdp_cfg(cfg_debug)
    with open_dict(cfg):
        cfg.method.accumulate = accumulate
    assert D.check_fsdp_config(cfg) is True
    assert cfg.method.accumulate == accumulate


def test_accumulation_windows_on_a_4bit_base_under_fsdp(cfg_debug, monkeypatch):
    """A 4-bit base's packed shards cannot hold W + dW: window refused in one line, auto takes micro_batch."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = fsdp_cfg(cfg_debug)
    with open_dict(cfg):
        cfg.model.quantization = "nf4"
        cfg.method.accumulate = "window"
    with pytest.raises(FrodCliError, match="accumulate=window with train.fsdp on a nf4 base"):
        D.check_fsdp_config(cfg)
    cfg.method.accumulate = "auto"
    assert D.check_fsdp_config(cfg) is True
    assert cfg.method.accumulate == "micro_batch"


@pytest.mark.parametrize("method, local_rank, options", [
    ("frod", "0", {}),  # the first process of a node loads
    ("frod", "1", {"empty": True}),  # the others build the structure on meta
    ("full", "1", {"empty": True}),
    ("pissa", "1", {}),  # initializes from the base weights: every process loads
    ("peft_frod", "1", {}),
])
def test_who_loads_the_base(monkeypatch, method, local_rank, options):
    from conftest import compose_train

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    cfg = compose_train(["debug=default", f"method={method}", "train.fsdp.enabled=true"])
    assert D.load_options(cfg, "no") == options
    cfg.train.fsdp.load_on_rank0 = False
    assert D.load_options(cfg, "no") == {}


def test_cpu_offload_shards_one_process_only_on_a_gpu_launch(cfg_debug, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = fsdp_cfg(cfg_debug, cpu_offload=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.check_fsdp_config(cfg) is True  # torchrun --nproc_per_node 1 on a GPU: weights in host memory
    with open_dict(cfg):
        cfg.train.cpu = True
    assert D.check_fsdp_config(cfg) is False  # a CPU launch holds its weights in host memory already


def test_70b_recipes_compose_offline(monkeypatch):
    """The 70B recipes of docs/SCALING.md pass every check before any work, sharded as a 2- or 8-process launch
    sees them: NF4 FRoD / QLoRA / DoRA with offloaded shards, bf16 FRoD / LoRA / full; full on NF4 is refused."""
    from conftest import compose_train

    from frod_cli.training import preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    for recipe, methods in (("qfrod_llama2_70b", ("frod", "lora", "dora")), ("frod_llama2_70b", ("frod", "lora", "full"))):
        for method in methods:
            cfg = compose_train([f"recipe={recipe}", f"method={method}"])
            preflight.validate(cfg)
            assert D.check_fsdp_config(cfg) is True
    assert cfg.model.name_or_path == "meta-llama/Llama-2-70b-hf" and cfg.train.gradient_checkpointing
    nf4 = compose_train(["recipe=qfrod_llama2_70b"])
    assert nf4.model.quantization == "nf4" and nf4.train.fsdp.cpu_offload and nf4.per_method.frod.sparse_rate == 0.02
    with pytest.raises(FrodCliError, match="4-bit weights cannot be trained"):
        preflight.validate(compose_train(["recipe=qfrod_llama2_70b", "method=full"]))


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
import copy, json, torch
from types import SimpleNamespace
from transformers import BertConfig, BertForSequenceClassification
from frod_cli.frod import FrodConfig, apply_frod
from frod_cli.training import distributed as D

torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
apply_frod(model, FrodConfig(target_modules=["query", "value"], sparse_rate=0.05, modules_to_save=["classifier"]))
reference = copy.deepcopy(model)  # the same weights, unsharded, in float32
fc = SimpleNamespace(enabled=True, wrap=None, reshard_after_forward=True, cpu_offload=False,
                     state_dict_type="FULL_STATE_DICT", version=2, load_on_rank0=False)
acc = D.make_accelerator(fc, mixed_precision="bf16", cpu=True)
acc.set_model_policy(model, None)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, opt = acc.prepare(model, opt)
ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(acc.process_index))
labels = torch.tensor([0, 1, 1, 0])
out = model(input_ids=ids, labels=labels)
acc.backward(out.loss)
with torch.no_grad():
    loss32 = reference(input_ids=ids, labels=labels).loss
with open(f"result-{acc.process_index}.json", "w") as f:
    json.dump([float(out.loss), float(loss32), str(out.logits.dtype), str(model.classifier.weight.grad.dtype),
               acc.state.fsdp_plugin.mixed_precision_policy is not None], f)
del model, opt, out  # the sharded model holds the process group: released by the shutdown, as frod train does
D.shutdown(acc)
'''


@pytest.mark.slow
def test_fsdp_mixed_precision_path(tmp_path):
    """train.mixed_precision=bf16 under FSDP (a GPU setting; the recipe turns it off on CPU): Accelerate's
    MixedPrecisionPolicy gathers the sharded weights in bf16, the forward autocasts as under DDP, so the
    float32 head FSDP leaves whole meets bf16 activations without a dtype error, the outputs are float32, and the
    loss is the unsharded float32 model's within bf16's precision. Driven through the accelerator directly, on CPU
    (one launch, one process group: a second group in the same processes is not what frod train does)."""
    script = tmp_path / "mp.py"
    script.write_text(MIXED_PRECISION_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        loss, loss32, logits, grad, policy = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert (logits, grad, policy) == ("torch.float32", "torch.float32", True)
        assert loss == pytest.approx(loss32, rel=2e-2) and loss != loss32  # bf16 was used, and is close


def test_bench_fsdp_bytes_per_rank(tmp_path):
    """scripts/bench.py --fsdp --fsdp-parts bytes on tiny shapes (one two-process launch): per rank, the NF4 base's
    parameter bytes and method=full's trainable plus AdamW bytes are at most 0.6 x one process's (byte counts, not
    timings: they hold on any machine). The loading part runs LLaMA-7B shapes (docs/PERFORMANCE.md); not here."""
    from frod_cli.bench.cli import main

    out = tmp_path / "fsdp.json"
    assert main(["--fsdp", "--fsdp-parts", "bytes", "--fsdp-bytes-shape", "tiny", "--fsdp-blocks", "2", "--quiet",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"environment", "wall_s", "bytes", "bytes_shape", "processes"}
    targets = result["bytes"]["targets"]
    assert 0.45 < targets["nf4_parameters_per_rank_vs_one"] <= 0.6
    assert 0.45 < targets["full_trainable_adamw_per_rank_vs_one"] <= 0.6
    assert [r["rank"] for r in result["bytes"]["ranks"]] == [0, 1]


def test_bench_fsdp_refuses_unknown_parts():
    from frod_cli.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--fsdp", "--fsdp-parts", "load,speed"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", ["tiny:llama", "offline:all-minilm-l6-v2"])
def test_an_empty_base_is_the_loaded_structure_on_meta(name):
    """What a process that receives rank 0's weights builds (models.load_model(empty=True)): the same parameters
    and buffers, names, shapes and dtypes, all on the meta device, nothing read, and the RNG untouched."""
    from omegaconf import OmegaConf

    from frod_cli.config import ModelConfig
    from frod_cli.models import load_model
    from frod_cli.training.builders import build_task
    from conftest import compose_train

    task = build_task(compose_train(["recipe=sft_smoke"]).task, 42)  # a causal LM: no labels to read first
    spec = OmegaConf.structured(ModelConfig(name_or_path=name))
    loaded, _ = load_model(spec, task)
    state = torch.get_rng_state()
    empty, _ = load_model(spec, task, empty=True)
    assert torch.equal(torch.get_rng_state(), state)
    shapes = lambda m: {n: (tuple(t.shape), t.dtype) for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert shapes(empty) == shapes(loaded)
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
