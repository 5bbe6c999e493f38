"""FRoD on a 4-bit base (bitsandbytes NF4 on the CPU): loading (model.quantization), the core on Linear4bit
layers (identity at init in every evaluation order, a step moves the outputs, merged == unmerged, nothing
m x n saved for the backward, the window and the evaluation cache), the adapter across processes and bases,
the refusals, and recipe=qfrod_smoke end to end with frod and with lora (QLoRA)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import compose_train  # noqa: E402
from frod_cli.frod import (FrodError, accumulate, apply_frod, evaluation_cache,  # noqa: E402
                           evaluation_cache_bytes, frod_layers, load_adapter, merge_and_unload, save_adapter,
                           window_buffer_bytes)
from frod_cli.frod import FrodConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(quantization="nf4", dtype="float32"):
    """The tiny LLaMA of recipe=qfrod_smoke, as `frod train` loads it (seeded), computing in `dtype` (what frod train
    does on a CPU that computes `dtype` natively; on one that emulates it, it would compute in float32)."""
    from frod_cli.training import builders as B

    cfg = compose_train(["recipe=qfrod_smoke", f"model.quantization={quantization}", f"model.dtype={dtype}"])
    task = B.build_task(cfg.task, int(cfg.train.seed))
    model, tok = B.load_base(cfg.model, task, int(cfg.train.seed))
    return model, tok


@pytest.fixture(scope="module")
def nf4_base():
    model, _ = load()
    return model


@pytest.fixture
def nf4(nf4_base):
    return copy.deepcopy(nf4_base)


X = torch.randint(1000, 20000, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def set_mode(model, mode):
    for _, layer in frod_layers(model):
        layer.mode = mode


def adapt(model, rate=0.05):
    return apply_frod(model, FrodConfig(target_modules=TARGETS, sparse_rate=rate, seed=0))


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in frod_layers(model):
            layer.frod_lambda.mul_(1 + 0.3 * torch.randn(layer.frod_lambda.shape, generator=g))
            layer.frod_s.add_(0.3 * torch.randn(layer.frod_s.shape, generator=g))


def test_loads_in_4bit_with_heads_in_full_precision(nf4):
    from frod_cli.models import base_quantization

    q = nf4.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization
    assert type(nf4.lm_head) is torch.nn.Linear and nf4.lm_head.weight.dtype == torch.float32
    assert base_quantization(nf4) == "nf4" and q.support_avx512bf16_for_cpu is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_identity_at_init_in_every_order(dtype, nf4):
    """Exact on the CPU: the base's own 4-bit matmul dequantizes W_q and multiplies, which is what the
    materialized orders do with dW = 0, and the projected order runs the base layer on x + 0."""
    model = nf4 if dtype == "float32" else load(dtype=dtype)[0]
    base_eval = logits(model)
    model.train()
    base_train = model(input_ids=X).logits.detach()
    model.eval()
    adapt(model)
    for mode in ("auto", "materialize", "project"):
        set_mode(model, mode)
        assert torch.equal(logits(model), base_eval), mode
        with evaluation_cache(model):
            assert torch.equal(logits(model), base_eval), mode
        model.train()
        assert torch.equal(model(input_ids=X).logits.detach(), base_train), mode
        model.eval()


def test_step_moves_outputs_and_merged_equals_unmerged(nf4, tmp_path):
    from transformers import AutoModelForCausalLM

    from frod_cli.models import dequantize_model

    base = logits(nf4)
    adapt(nf4)
    opt = torch.optim.AdamW([p for p in nf4.parameters() if p.requires_grad], lr=1e-2)
    nf4.train()
    nf4(input_ids=X, labels=X).loss.backward()
    opt.step()
    nf4.eval()
    stepped = logits(nf4)
    assert (stepped - base).abs().max() > 1e-3
    with evaluation_cache(nf4) as held:
        assert len(held.layers) == 14 and torch.allclose(logits(nf4), stepped, atol=1e-5)
    assert all(layer._held is None for _, layer in frod_layers(nf4))  # freed with the block
    merged = dequantize_model(merge_and_unload(nf4))
    assert not hasattr(merged.config, "quantization_config") and getattr(merged, "hf_quantizer", None) is None
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    assert torch.allclose(logits(merged), stepped, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no bitsandbytes config
    assert torch.equal(logits(plain), logits(merged))


def saved_shapes(model, x):
    """Shapes of the tensors the forward saves for the backward beyond the model's own parameters and buffers
    (then runs the backward)."""
    own = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    shapes = []

    def pack(t):
        if t.data_ptr() not in own:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return shapes


def test_materialized_training_keeps_no_m_by_n_and_matches_projection(nf4):
    """The materialized order on a 4-bit base saves only x for its backward (W + dW is rebuilt there), and
    its gradients are the projected order's."""
    adapt(nf4)
    perturb(nf4)
    nf4.train()
    grads = {}
    for mode in ("materialize", "project"):
        set_mode(nf4, mode)
        nf4.zero_grad()
        shapes = saved_shapes(nf4, X)
        m_by_n = {(layer.out_features, layer.in_features) for _, layer in frod_layers(nf4)}
        assert not m_by_n & set(shapes), mode
        grads[mode] = [p.grad.clone() for p in nf4.parameters() if p.requires_grad]
    for a, b in zip(grads["materialize"], grads["project"]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_window_exact_and_memory_estimates_on_4bit(nf4):
    adapt(nf4)
    perturb(nf4)
    set_mode(nf4, "materialize")
    nf4.train()
    xs = [X, X.flip(0)]
    nf4.zero_grad()
    for x in xs:
        nf4(input_ids=x, labels=x).loss.backward()
    plain = [p.grad.clone() for p in nf4.parameters() if p.requires_grad]
    nf4.zero_grad()
    with accumulate(nf4, micro_batches=2) as window:
        for x in xs:
            nf4(input_ids=x, labels=x).loss.backward()
    assert len(window.layers) == 14
    for a, p in zip(plain, [p for p in nf4.parameters() if p.requires_grad]):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7)
    mn = sum(layer.out_features * layer.in_features for _, layer in frod_layers(nf4))
    assert window_buffer_bytes(nf4) == mn * (4 + 4)  # W + dW in the compute dtype (float32) + the float32 sum
    assert evaluation_cache_bytes(nf4) == mn * 4
    one = next(iter(frod_layers(nf4)))[1]
    with evaluation_cache(nf4, max_bytes=one.out_features * one.in_features * 4) as held:
        assert len(held.layers) == 1 and len(held.skipped) == 13
        assert torch.allclose(logits(nf4), logits(merge_copy(nf4)), atol=1e-5)


def merge_copy(model):
    return merge_and_unload(copy.deepcopy(model))


def test_gradient_checkpointing_on_4bit(nf4):
    adapt(nf4)
    perturb(nf4)
    nf4.train()
    nf4(input_ids=X, labels=X).loss.backward()
    plain = [p.grad.clone() for p in nf4.parameters() if p.requires_grad]
    nf4.zero_grad()
    nf4.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    nf4(input_ids=X, labels=X).loss.backward()
    for a, p in zip(plain, [p for p in nf4.parameters() if p.requires_grad]):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-8)


LOAD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from test_quantized import X, load, logits
    from frod_cli.frod import load_adapter
    torch.set_num_threads({threads})
    model, _ = load()
    load_adapter(model, {path!r})
    save_file({{"out": logits(model).contiguous()}}, {out!r})
""")


def test_adapter_round_trip_in_new_process_and_other_bases(nf4, tmp_path):
    """Saved on the NF4 base, read back bit for bit by another process; another quantization (or none) is
    refused unless asked; merge_into folds the NF4-built dW into the unquantized weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    from frod_cli.frod import merge_into

    adapt(nf4)
    perturb(nf4)
    expected = logits(nf4)
    path = tmp_path / "adapter"
    save_adapter(nf4, path)
    assert json.loads((path / "adapter_config.json").read_text())["base_quantization"] == "nf4"
    script = LOAD.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(), path=str(path),
                         out=str(tmp_path / "out.safetensors"))
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["out"], expected)
    plain, _ = load(quantization="none")
    with pytest.raises(FrodError, match="quantization=nf4, this base has quantization=none"):
        load_adapter(copy.deepcopy(plain), path)
    with pytest.raises(FrodError, match="this base has quantization=fp4"):
        load_adapter(load(quantization="fp4")[0], path)
    load_adapter(copy.deepcopy(plain), path, allow_other_base=True)  # asked for: it loads
    q_before = plain.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dW = dict(frod_layers(nf4))["model.layers.0.self_attn.q_proj"].delta_weight().detach()
    merged = merge_into(nf4, plain)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_before + dW)
    gap = (logits(merged) - expected).abs().max()  # the NF4 rounding of the base, not the update
    assert 0 < gap < (expected - logits(merge_copy(nf4))).abs().max() + 0.5


def test_refusals_before_any_work(monkeypatch):
    from frod_cli import FrodCliError
    from frod_cli.training import distributed, preflight

    for method, what in (("full", "trains every weight"), ("pissa", "PiSSA"), ("peft_frod", "dense matrix")):
        cfg = compose_train(["recipe=qfrod_smoke", f"method={method}"])
        with pytest.raises(FrodCliError, match=what):
            preflight.validate(cfg)
    preflight.validate(compose_train(["recipe=qfrod_smoke", "method=lora"]))
    monkeypatch.setattr(distributed, "world_size_of_launch", lambda: 2)  # as under torchrun --nproc_per_node 2
    sharded = compose_train(["recipe=qfrod_smoke", "train.fsdp.enabled=true"])
    assert distributed.check_fsdp_config(sharded) is True  # FSDP-QLoRA's route (tests/test_fsdp.py trains it)
    # packed in the compute dtype (FSDP shards float tensors), loaded on the CPU, on every process
    assert distributed.load_options(sharded, "no") == {"quant_storage": torch.float32, "quant_device": "cpu"}
    assert distributed.load_options(sharded, "bf16")["quant_storage"] == torch.bfloat16
    with pytest.raises(ValueError, match="model.quantization must be one of"):
        load(quantization="int3")


# ---- recipe=qfrod_smoke end to end: FRoD and QLoRA on the same NF4 base ---------------------------------
@pytest.fixture(scope="module", params=["frod", "lora"])
def qfrod_run(request, tmp_path_factory):
    from frod_cli.cli import run_verb

    run = tmp_path_factory.mktemp(f"qfrod_{request.param}") / "run"
    code, _ = run_verb("train", ["recipe=qfrod_smoke", f"method={request.param}", "train.progress=false",
                                 f"hydra.run.dir={run}"])
    assert code == 0
    return request.param, run


@pytest.mark.slow
def test_qfrod_smoke_merged_is_plain_and_generates_what_the_adapter_does(qfrod_run):
    """merged/ holds the dequantized base plus the update in model.dtype (no quantization config): plain
    transformers loads it, and it decodes token for token what the 4-bit base + adapter decodes. For lora this
    also checks the merge into the dequantized base (PEFT's own merge re-quantizes and loses about half the
    update on this run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from frod_cli.decoding import encode_prompt, generate_ids
    from frod_cli.training.builders import load_trained

    method, run = qfrod_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["merge_max_abs_diff"] < 1e-4
    assert (metrics["compute_dtype"], metrics["cpu_capability"]) == ("float32", torch.backends.cpu.get_cpu_capability())
    assert "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    tok = AutoTokenizer.from_pretrained(run / "merged")
    trained = load_trained(str(run), use_adapter=True, load_data=False)
    assert any(type(m).__name__ == "Linear4bit" for m in trained.model.modules())
    prompts = [encode_prompt(tok, f"### Instruction:\n{p}\n\n### Response:\n")
               for p in ("What is 2 plus 3?", "Name a colour.")]
    settings = dict(max_new_tokens=6, do_sample=False)
    with trained.method.evaluation_context(trained.model):
        adapted = generate_ids(trained.model.eval(), trained.preprocessor, prompts, batch_size=2, **settings)
    assert generate_ids(plain, tok, prompts, batch_size=2, **settings) == adapted
    with torch.no_grad():  # ... and training moved the model: merged/ is not the base
        base, _ = load()
        ids = torch.tensor([prompts[0]])
        assert (plain(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.slow
def test_frod_merge_into_the_unquantized_base(qfrod_run, tmp_path):
    """`frod merge base=tiny:llama`: the same update folded into the unquantized weights; the report says how far
    its outputs are from the trained (4-bit) model's, which is the NF4 rounding of the base."""
    from frod_cli.cli import run_verb

    method, run = qfrod_run
    code, report = run_verb("merge", [f"run={run}", "base=tiny:llama", f"output={tmp_path / 'merged'}"])
    assert code == 0 and report["base"] == "tiny:llama"
    assert 1e-4 < report["max_abs_diff"] < 1.0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_qfrod_llama2_7b_composes_offline():
    """The 24 GB recipe: LLaMA-2-7B in NF4 with the paper's commonsense protocol; FRoD, QLoRA, DoRA and VeRA pass
    the checks before any work."""
    from frod_cli.training import preflight

    for method in ("frod", "lora", "dora", "vera"):
        cfg = compose_train(["recipe=qfrod_llama2_7b", f"method={method}"])
        preflight.validate(cfg)
    assert cfg.model.quantization == "nf4" and cfg.model.dtype == "bfloat16"
    assert cfg.model.compute_dtype is None  # chosen by the run: bfloat16 on a GPU, float32 on a CPU that emulates it
    assert cfg.train.gradient_checkpointing and "down_proj" not in cfg.model.target_modules
    assert cfg.per_method.frod.sparse_rate == 0.02  # the paper's, applied when method=frod


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_identity_at_init_on_gpu():
    """On a GPU bitsandbytes' own 4-bit forward is a fused kernel, not dequantize-then-GEMM: the projected order
    (the base layer on x + 0) stays exact, the materialized ones (F.linear with dequant(W_q) + 0) differ from it by
    the kernels' rounding in bfloat16, which is the tolerance stated in docs/PERFORMANCE.md."""
    model, _ = load(dtype="bfloat16")
    x = X.to(next(model.parameters()).device)
    base = logits(model, x).float()
    adapt(model)
    for mode, tol in (("project", 0.0), ("materialize", 2e-2), ("auto", 2e-2)):
        set_mode(model, mode)
        diff = (logits(model, x).float() - base).abs().max().item() / base.abs().max().item()
        print(f"NF4 on cuda, identity at init, {mode}: max |diff| / max |y| = {diff:.2e}")
        assert diff <= tol, mode


@pytest.mark.slow
def test_bench_quantized_memory_smoke(tmp_path):
    """scripts/bench.py --quantized memory on the tiny shape (one block): the four rows, and NF4 blocks are
    smaller than bf16 ones (no speed or memory target is asserted here: those are the benchmark's)."""
    from frod_cli.bench.cli import main

    out = tmp_path / "q.json"
    assert main(["--quantized", "memory", "--q-shape", "tiny", "--q-blocks", "1", "--q-steps", "1",
                 "--q-seq", "8", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["base"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {("bf16", "frod"), ("bf16", "lora"), ("nf4", "frod"), ("nf4", "lora")}
    from frod_cli.precision import cpu_native  # the record says which CPU kind the figures need

    env = result["environment"]
    assert env["compute_dtypes"] == {"bfloat16": "native" if cpu_native("bfloat16") else "emulated"}
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rows["nf4", "frod"]["blocks_bytes"] < 0.5 * rows["bf16", "frod"]["blocks_bytes"]
    assert rows["nf4", "frod"]["trainable"] == rows["bf16", "frod"]["trainable"] > 0
