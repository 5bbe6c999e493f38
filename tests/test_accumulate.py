"""accumulate(model): dW built once per gradient-accumulation window, its gradient projected once, exactly."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from frod_cli.frod import FrodConfig, FrodError, FrodLinear, accumulate, apply_frod, frod_layers, window_buffer_bytes
from frod_cli.frod.layer import is_conv1d

from tiny_models import FAMILIES, output_of

FAMS = ["bert", "llama", "gpt2"]  # gpt2: Conv1D layers (weight stored in x out)
K = 3
_CACHE = {}


def adapted(fam, **kw):
    """A tiny model of `fam` with FRoD applied and perturbed values (so dW != 0); built once, then copied."""
    key = (fam, tuple(sorted(kw.items())))
    if key not in _CACHE:
        build, targets, save = FAMILIES[fam]
        model, inputs = build(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_frod(model, FrodConfig(target_modules=targets, sparse_rate=0.05, seed=0, modules_to_save=save, **kw))
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _, layer in frod_layers(model):
                scale = 0.05 * layer.frod_sigma.mean()
                layer.frod_lambda.add_(torch.randn(layer.frod_lambda.shape, generator=g) * scale)
                layer.frod_s.copy_(torch.randn(layer.frod_s.shape, generator=g) * scale)
        _CACHE[key] = (model, inputs)
    model, inputs = copy.deepcopy(_CACHE[key])
    return model, micro_batches(inputs)


def micro_batches(inputs, k=K):
    g = torch.Generator().manual_seed(7)
    return [{n: torch.randint(0, 100, v.shape, generator=g) for n, v in inputs.items()} for _ in range(k)]


def loss_of(model, batch):
    out = output_of(model, batch).float()
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out * readout).sum()


def run(model, batches, window=None):
    """Backward every micro-batch; inside `window` (a context manager) when given."""
    ctx = window if window is not None else torch.enable_grad()
    with ctx as w:
        for b in batches:
            loss_of(model, b).backward()
    return w


def frod_grads(model):
    return {f"{n}.{p}": getattr(layer, f"frod_{p}").grad for n, layer in frod_layers(model) for p in ("lambda", "s")}


def assert_grads_close(got, ref, rtol=1e-5):
    assert got.keys() == ref.keys()
    for key, r in ref.items():
        g = got[key]
        assert g is not None and r is not None, key
        assert g.dtype == torch.float32
        err = (g - r).norm() / r.norm().clamp_min(1e-30)
        assert err <= rtol, f"{key}: relative error {err:.2e}"


def layer_count(model):
    return sum(1 for _ in frod_layers(model))


def no_window_left(model):
    return all(layer._window is None for _, layer in frod_layers(model))


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("mode", ["materialize", "project", "auto"])
@pytest.mark.parametrize("store_u", [False, True])
def test_window_grads_equal_micro_batch_grads(fam, mode, store_u):
    ref_model, batches = adapted(fam, mode=mode, store_u=store_u)
    model = copy.deepcopy(ref_model)
    run(ref_model, batches)
    w = run(model, batches, accumulate(model, micro_batches=K))
    assert_grads_close(frod_grads(model), frod_grads(ref_model))
    if mode == "project":
        assert w.layers == []  # a forced per-token order keeps its per-micro-batch path
    elif mode == "materialize":
        assert len(w.layers) == layer_count(model)  # every layer took the window ...
    else:
        assert w.layers  # the auto rule takes it for some layers at least
    assert w.builds == len(w.layers)  # ... and built its dW once, not once per micro-batch
    assert w.memory_bytes()["total"] == 0 and no_window_left(model)
    if fam == "gpt2" and mode == "materialize":
        assert all(is_conv1d(layer.base_layer) for _, layer in frod_layers(model))


def test_dW_built_once_and_buffers_while_open(monkeypatch):
    model, batches = adapted("llama", mode="materialize")
    calls = []
    original = FrodLinear.delta_weight
    monkeypatch.setattr(FrodLinear, "delta_weight", lambda self: calls.append(self) or original(self))
    keys, n_params = set(model.state_dict()), len(list(model.parameters()))
    with accumulate(model, micro_batches=K) as w:
        for b in batches:
            loss_of(model, b).backward()
        assert set(model.state_dict()) == keys and len(list(model.parameters())) == n_params
        held = w.memory_bytes()
        mn = sum(layer.out_features * layer.in_features for _, layer in frod_layers(model))
        assert held["weights"] == 4 * mn and held["grad_buffers"] == 4 * mn  # one W + dW and one G per layer
        assert held["total"] == window_buffer_bytes(model)  # every layer windowed: the estimate is exact
        assert all(layer.frod_lambda.grad is None for _, layer in frod_layers(model))  # nothing projected yet
    assert len(calls) == layer_count(model) and len(set(map(id, calls))) == layer_count(model)
    # without a window: one build per layer per micro-batch
    calls.clear()
    run(model, batches)
    assert len(calls) == K * layer_count(model)


def test_one_micro_batch_takes_no_layer():
    """K = 1: the window would cost as much (stored U) or more (recomputed U) than the plain path."""
    for store_u in (False, True):
        model, batches = adapted("bert", mode="materialize", store_u=store_u)
        assert run(model, batches[:1], accumulate(model, micro_batches=1)).layers == []


def test_no_grad_evaluation_inside_window():
    ref_model, batches = adapted("gpt2", mode="auto")
    model = copy.deepcopy(ref_model)
    probe = batches[0]
    with torch.no_grad():
        expected = output_of(ref_model, probe)
    run(ref_model, batches)
    with accumulate(model, micro_batches=K) as w:
        with torch.no_grad():
            before = output_of(model, probe)  # before any layer has decided: its own no-grad path
        loss_of(model, batches[0]).backward()
        sums = {p.name: p.G.clone() for p in w.parts if p.G is not None}
        assert sums
        model.eval()
        with torch.no_grad():
            during = output_of(model, probe)  # windowed layers use the window's W + dW
        assert {p.name: p.G for p in w.parts if p.G is not None}.keys() == sums.keys()
        assert all(torch.equal(p.G, sums[p.name]) for p in w.parts if p.G is not None)
        for b in batches[1:]:
            loss_of(model, b).backward()
    assert torch.equal(before, expected)
    assert torch.allclose(during, expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(frod_grads(model), frod_grads(ref_model))


def test_later_step_without_window_is_unaffected():
    ref_model, batches = adapted("bert", mode="materialize")
    model = copy.deepcopy(ref_model)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref_model, model)]
    run(ref_model, batches)
    run(model, batches, accumulate(model, micro_batches=K))
    for m, opt in zip((ref_model, model), opts):
        opt.step()
        opt.zero_grad(set_to_none=True)
    run(ref_model, batches[:2])
    run(model, batches[:2])
    assert_grads_close(frod_grads(model), frod_grads(ref_model))
    assert no_window_left(model)


def test_grads_add_to_existing_grad():
    ref_model, batches = adapted("llama", mode="materialize")
    model = copy.deepcopy(ref_model)
    run(ref_model, batches[:1])
    run(model, batches[:1])  # a first plain micro-batch leaves .grad set ...
    run(ref_model, batches[1:])
    w = run(model, batches[1:], accumulate(model, micro_batches=K - 1))  # ... and the window adds to it
    assert len(w.layers) == layer_count(model)
    assert_grads_close(frod_grads(model), frod_grads(ref_model))


def test_exception_inside_window_leaves_no_state():
    fresh, batches = adapted("gpt2", mode="materialize")
    model = copy.deepcopy(fresh)
    with pytest.raises(ZeroDivisionError):
        with accumulate(model, micro_batches=K) as w:
            loss_of(model, batches[0]).backward()
            assert w.memory_bytes()["grad_buffers"] > 0
            1 / 0
    assert no_window_left(model) and w.memory_bytes()["total"] == 0 and not w.open
    assert all(g is None for g in frod_grads(model).values())  # nothing projected
    run(fresh, batches)
    run(model, batches)
    assert_grads_close(frod_grads(model), frod_grads(fresh))


def test_backward_after_close_and_step_inside_window_refused():
    model, batches = adapted("bert", mode="materialize")
    with accumulate(model, micro_batches=K):
        loss = loss_of(model, batches[0])
    with pytest.raises(RuntimeError, match="already closed"):
        loss.backward()
    assert no_window_left(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.zero_grad(set_to_none=True)
    run(model, batches[:1])  # .grad set by a plain micro-batch
    with pytest.raises(FrodError, match="changed inside an accumulate"):
        with accumulate(model, micro_batches=K):
            loss_of(model, batches[0]).backward()
            opt.step()  # lambda and S change: the window's dW is stale
            loss_of(model, batches[1])
    assert no_window_left(model)


def test_windows_do_not_nest_and_disabled_is_a_no_op():
    ref_model, batches = adapted("bert", mode="materialize")
    model = copy.deepcopy(ref_model)
    with accumulate(model):
        with pytest.raises(FrodError, match="do not nest"):
            with accumulate(model):
                pass
    assert no_window_left(model)
    run(ref_model, batches)
    w = run(model, batches, accumulate(model, micro_batches=K, enabled=False))
    assert w.layers == [] and w.builds == 0
    for key, g in frod_grads(model).items():
        assert torch.equal(g, frod_grads(ref_model)[key])  # the plain path, bit for bit
    plain = torch.nn.Linear(3, 3)
    with accumulate(plain) as w:  # a model without FRoD layers: a no-op window
        plain(torch.ones(1, 3)).sum().backward()
    assert w.layers == []


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("fam", ["llama", "bert"])
def test_gradient_checkpointing_reuses_window_dW(fam, monkeypatch):
    ref_model, batches = adapted(fam, mode="materialize")
    ref_model = _no_dropout(ref_model).train()
    model = copy.deepcopy(ref_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run(ref_model, batches)
    calls, forwards = [], []
    original, original_forward = FrodLinear.delta_weight, FrodLinear.forward
    monkeypatch.setattr(FrodLinear, "delta_weight", lambda self: calls.append(self) or original(self))
    monkeypatch.setattr(FrodLinear, "forward", lambda self, x: forwards.append(self) or original_forward(self, x))
    w = run(model, batches, accumulate(model, micro_batches=K))
    assert len(forwards) > K * layer_count(model)  # checkpointing did recompute forwards
    assert len(w.layers) == layer_count(model)
    encoder_layers = [n for n in w.layers if ".layers." in n or ".layer." in n]
    assert encoder_layers  # the checkpointed blocks' layers took the window
    assert len(calls) == layer_count(model)  # recomputation reused W + dW: no build beyond one per layer
    assert_grads_close(frod_grads(model), frod_grads(ref_model))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_reentrant_checkpoint_is_exact():
    ref_model, batches = adapted("llama", mode="materialize")
    ref_model = _no_dropout(ref_model).train()
    model = copy.deepcopy(ref_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()  # the reentrant kind needs an input that requires grad
    run(ref_model, batches)
    run(model, batches, accumulate(model, micro_batches=K))
    assert_grads_close(frod_grads(model), frod_grads(ref_model))


def test_bfloat16_model_sums_in_float32():
    model, batches = adapted("llama", mode="materialize")
    model = model.to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    run(ref_model, batches)
    with accumulate(model, micro_batches=K) as w:
        for b in batches:
            loss_of(model, b).backward()
        assert all(p.G.dtype == torch.float32 and p.W_eff.dtype == torch.bfloat16 for p in w.parts)
    # both paths see the same bfloat16 weight gradients; only the order of the float32 sums differs
    assert_grads_close(frod_grads(model), frod_grads(ref_model), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Windows over FSDP-sharded weights (accumulate.py, "Sharded weights"); their gradients over 2 processes:
# tests/test_fsdp.py::test_sharded_window_grads_equal_micro_batch_and_unsharded (in test_fsdp's one launch)
# ---------------------------------------------------------------------------------------------------
def test_auto_takes_the_window_only_where_its_buffers_fit(monkeypatch, caplog):
    """method.accumulate=auto: the window when its buffers (window_buffer_bytes) take under half the free memory,
    counting the processes that share it; per micro-batch otherwise; the check says so in the log."""
    import logging

    from frod_cli.methods import frod as frod_method
    from frod_cli.methods.base import method_config

    model, _ = adapted("llama", mode="materialize")
    need = window_buffer_bytes(model)
    choices = {}
    for free, sharing in ((4 * need, 1), (int(1.5 * need), 1), (4 * need, 2), (None, 1)):
        monkeypatch.setattr(frod_method, "_free_memory", lambda m, free=free: free)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(sharing))
        method = frod_method.FrodMethod(method_config("frod"))
        with caplog.at_level(logging.INFO, logger="frod.methods.frod"):
            caplog.clear()
            context = method.accumulation(model, 4)
        choices[(free, sharing)] = method.window_choice
        assert f"method.accumulate=auto: {method.window_choice}" in caplog.text
        assert isinstance(context, contextlib.nullcontext) == (method.window_choice == "micro_batch")
    assert choices == {(4 * need, 1): "window", (int(1.5 * need), 1): "micro_batch", (4 * need, 2): "micro_batch",
                       (None, 1): "window"}
    method = frod_method.FrodMethod(method_config("frod"))
    assert isinstance(method.accumulation(model, 1), contextlib.nullcontext)  # K = 1: no window to take


def test_sharded_window_buffers_are_one_shard_per_weight():
    """window_buffer_bytes(model, world): per layer ceil(m / world) rows of W (weights' dtype) and of G (float32);
    Conv1D layers, sharded by columns, cannot take a window over shards and count nothing."""
    model, _ = adapted("llama", mode="materialize")
    shapes = [(layer.out_features, layer.in_features) for _, layer in frod_layers(model)]
    assert any(m % 3 for m, _ in shapes)  # uneven shards somewhere
    assert window_buffer_bytes(model, world=3) == sum(-(-m // 3) * n * 8 for m, n in shapes)
    assert window_buffer_bytes(model, world=1) == window_buffer_bytes(model) == sum(m * n * 8 for m, n in shapes)
    gpt2, _ = adapted("gpt2", mode="materialize")
    assert window_buffer_bytes(gpt2, world=2) == 0 and window_buffer_bytes(gpt2) > 0
