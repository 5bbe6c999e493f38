"""The FRoD core, over every model family (tiny models plus the real all-MiniLM-L6-v2)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from frod_cli.frod import (FrodConfig, FrodError, apply_frod, disable_adapter, frod_layers, load_adapter,
                           merge, merge_and_unload, param_groups, save_adapter, summary, unmerge)
from frod_cli.frod.basis import shared_basis, sparse_pattern
from frod_cli.frod.layer import weight_of

from tiny_models import FAMILIES, output_of

ALL = list(FAMILIES)
RATE = 0.05


_CACHE = {}


def adapted(name, seed=0, rate=RATE, **kw):
    """(adapted model, inputs, base output, base state dict, config); built once per key, then copied."""
    key = (name, seed, rate, tuple(sorted(kw.items())))
    if key not in _CACHE:
        build, targets, save = FAMILIES[name]
        model, inputs = build(seed)
        with torch.no_grad():
            base_out = output_of(model, inputs)
        base_weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
        cfg = FrodConfig(target_modules=targets, sparse_rate=rate, seed=0, modules_to_save=save, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_frod(model, cfg)
        _CACHE[key] = (model, inputs, base_out, base_weights, cfg)
    return copy.deepcopy(_CACHE[key])


def perturb(model, scale=0.05, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in frod_layers(model):
            layer.frod_lambda.add_(torch.randn(layer.frod_lambda.shape, generator=g) * scale * layer.frod_sigma.mean())
            layer.frod_s.copy_(torch.randn(layer.frod_s.shape, generator=g) * scale * layer.frod_sigma.mean())


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=ALL)
def fam(request):
    return request.param


def test_identical_at_init(fam):
    model, inputs, base_out, _, _ = adapted(fam)
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base_out)
    # also under autograd (the training path) and with the per-token path forced
    assert torch.equal(output_of(model, inputs).detach(), base_out)
    for _, layer in frod_layers(model):
        layer.mode = "project"
    assert torch.equal(output_of(model, inputs).detach(), base_out)


def test_decomposition_reconstructs_weights(fam):
    model, *_ = adapted(fam)
    by_cat = {}
    for _, layer in frod_layers(model):
        W = weight_of(layer.base_layer).detach().float()
        rebuilt = layer.U @ torch.diag(layer.frod_sigma) @ layer.category.V.T
        assert rel(rebuilt, W) < 1e-5
        by_cat.setdefault(layer.category.key, []).append(layer.frod_sigma)
    for key, sigmas in by_cat.items():
        total = torch.stack(sigmas).pow(2).sum(0)
        if total.numel() and all(s.numel() for s in sigmas):
            # sum_i sigma_ik^2 = 1 for every k (Q has orthonormal columns); <= 1 for padded wide stacks
            assert torch.all(total <= 1 + 1e-4), key
            if not torch.any(total < 0.5):
                assert torch.allclose(total, torch.ones_like(total), atol=1e-4), key


def test_merge_equals_unmerged_and_unmerge_restores(fam):
    model, inputs, base_out, base_weights, _ = adapted(fam)
    perturb(model)
    with torch.no_grad():
        adapted_out = output_of(model, inputs)
        assert not torch.allclose(adapted_out, base_out)
        merge(model)
        merged_out = output_of(model, inputs)
        assert rel(merged_out, adapted_out) < 1e-5
        unmerge(model)
        assert torch.equal(output_of(model, inputs), adapted_out)
        with disable_adapter(model):
            assert torch.equal(output_of(model, inputs), base_out)
        plain = merge_and_unload(model)
    assert not any("frod" in n for n in plain.state_dict())
    assert set(plain.state_dict()) == set(base_weights)
    with torch.no_grad():
        assert rel(output_of(plain, inputs), adapted_out) < 1e-5


def _dense_reference_grads(model, inputs):
    """Each layer computes W' = U (diag(lambda) + S) V^T x + b, built densely, autograd through it."""
    originals = {}
    for name, layer in frod_layers(model):
        def fwd(x, layer=layer):
            M = torch.diag(layer.frod_lambda).index_put((layer.category.rows.long(), layer.category.cols.long()), layer.frod_s,
                                                         accumulate=True)
            Wp = layer.U.detach() @ M @ layer.category.V.T
            return F.linear(x, Wp.to(x.dtype), layer.base_layer.bias)
        originals[name] = layer.forward
        layer.forward = fwd
    try:
        return _grads(model, inputs)
    finally:
        for name, layer in frod_layers(model):
            layer.forward = originals[name]


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = output_of(model, inputs).float()
    # a fixed random readout: CLIP's embeddings are normalized, so |out|^2 would have no gradient
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    g = {}
    for name, layer in frod_layers(model):
        g[name + ".lambda"] = layer.frod_lambda.grad.clone()
        g[name + ".s"] = layer.frod_s.grad.clone()
    return g


@pytest.mark.parametrize("mode", ["materialize", "project"])
def test_gradients_match_dense_reference(fam, mode):
    model, inputs, *_ = adapted(fam)
    perturb(model)
    for _, layer in frod_layers(model):
        layer.mode = mode
    ours = _grads(model, inputs)
    ref = _dense_reference_grads(model, inputs)
    scale = max(v.abs().max().item() for v in ref.values())
    for key in ref:
        assert torch.allclose(ours[key], ref[key], rtol=1e-4, atol=1e-4 * scale), key


def test_trainable_count_and_requires_grad(fam):
    model, _, _, _, cfg = adapted(fam)
    expected = sum(l.in_features + int(RATE * l.in_features ** 2) for _, l in frod_layers(model))
    saved = sum(p.numel() for n, m in model.named_modules() if any(n.endswith(s) for s in cfg.modules_to_save)
                for p in m.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + saved
    assert summary(model)["frod_trainable"] == expected
    for n in trainable:
        assert n.endswith(("frod_lambda", "frod_s")) or any(f".{s}." in f".{n}" for s in cfg.modules_to_save), n
    groups = param_groups(model)
    assert sum(p.numel() for p in groups["sparse"]) == sum(int(RATE * l.in_features ** 2) for _, l in frod_layers(model))
    assert sum(p.numel() for p in groups["scale"]) == sum(l.in_features for _, l in frod_layers(model))
    assert sum(p.numel() for p in groups.get("head", [])) == saved


def test_pattern_is_offdiagonal_unique_and_seeded():
    for n in (16, 64, 300):
        r, c = sparse_pattern(n, 0.02, 0, "cat")
        assert r.numel() == int(0.02 * n * n)
        assert torch.all(r != c)
        assert torch.unique(r * n + c).numel() == r.numel()
        r2, c2 = sparse_pattern(n, 0.02, 0, "cat")
        assert torch.equal(r, r2) and torch.equal(c, c2)
        r3, c3 = sparse_pattern(n, 0.02, 1, "cat")
        assert not (torch.equal(r, r3) and torch.equal(c, c3))
        r4, c4 = sparse_pattern(n, 0.02, 0, "other")
        assert not (torch.equal(r, r4) and torch.equal(c, c4))
    # the large-n path (rejection sampling) keeps the same guarantees
    r, c = sparse_pattern(7100, 0.001, 3, "big")
    assert torch.all(r != c) and torch.unique(r * 7100 + c).numel() == r.numel() == int(0.001 * 7100 ** 2)


def test_same_seed_same_adapter():
    a, *_ = adapted("bert")
    b, *_ = adapted("bert")
    for (na, la), (nb, lb) in zip(frod_layers(a), frod_layers(b)):
        assert torch.equal(la.category.rows, lb.category.rows) and torch.equal(la.category.V, lb.category.V)
        assert torch.equal(la.frod_sigma, lb.frod_sigma)


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from tiny_models import FAMILIES, output_of
    from frod_cli.frod import load_adapter
    torch.set_num_threads({threads})  # the parent's: kernels may split (and round) differently
    for fam, path, out in json.loads({jobs!r}):
        model, inputs = FAMILIES[fam][0](0)
        load_adapter(model, path)
        with torch.no_grad():
            save_file({{"out": output_of(model, inputs).contiguous()}}, out)
""")


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every family's perturbed adapter (its trained head included) saved, then loaded onto a fresh base in ONE new
    process (nothing shared with this one but the files): fam -> (expected output, output after the reload, its
    adapter directory)."""
    work = tmp_path_factory.mktemp("reload")
    expected, jobs = {}, []
    for fam in ALL:
        model, inputs, *_ = adapted(fam)
        perturb(model)
        with torch.no_grad():
            for n, m in model.named_modules():  # a trained head travels with the adapter
                if n.endswith("classifier") and hasattr(m, "weight"):
                    m.weight.add_(0.1)
            expected[fam] = output_of(model, inputs)
        save_adapter(model, work / fam)
        jobs.append((fam, str(work / fam), str(work / f"{fam}.safetensors")))
    script = LOAD_SCRIPT.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                jobs=json.dumps(jobs))
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    from safetensors.torch import load_file

    return {fam: (expected[fam], load_file(out)["out"], Path(path)) for fam, path, out in jobs}


def test_save_load_in_new_process(fam, reloaded):
    expected, got, path = reloaded[fam]
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["fingerprint"] and meta["categories"]
    assert torch.equal(got, expected)
    other, _ = FAMILIES[fam][0](0)
    with torch.no_grad():  # the same architecture, other weights (e.g. another checkpoint)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    with pytest.raises(FrodError, match="different base model"):
        load_adapter(other, path)


def test_load_refuses_other_architecture_and_corrupt_files(tmp_path):
    model, *_ = adapted("bert")
    save_adapter(model, tmp_path / "a")
    vit_model, _ = FAMILIES["vit"][0](0)
    with pytest.raises(FrodError, match="does not fit"):
        load_adapter(vit_model, tmp_path / "a")
    w = tmp_path / "a" / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(FrodError, match="truncated or corrupt"):
        load_adapter(FAMILIES["bert"][0](0)[0], tmp_path / "a")
    with pytest.raises(FrodError, match="not a FRoD adapter"):
        load_adapter(FAMILIES["bert"][0](0)[0], tmp_path / "missing")


def test_clip_towers_are_separate_categories():
    model, *_ = adapted("clip")
    keys = [c["key"] for c in summary(model)["categories"]]
    assert any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.") for k in keys)
    assert len(keys) == 12  # 6 roles x 2 towers


def test_target_errors_and_regex():
    model, _ = FAMILIES["bert"][0](0)
    with pytest.raises(FrodError, match=r"match no linear layer.*attention\.self\.query"):
        apply_frod(model, FrodConfig(target_modules=["nonexistent"]))
    apply_frod(model, FrodConfig(target_modules=r".*layer\.\d+\.attention\.self\.(query|value)"))
    assert {c["key"].split(".")[-1].split("|")[0] for c in summary(model)["categories"]} == {"query", "value"}
    with pytest.raises(FrodError, match="already carries"):
        apply_frod(model, FrodConfig(target_modules=["key"]))
    for bad in (dict(sparse_rate=1.0), dict(sparse_rate=-0.1), dict(mode="fast"), dict(regularization=0)):
        with pytest.raises(FrodError):
            FrodConfig(target_modules=["query"], **bad)


def test_edge_cases_wide_zero_and_duplicate_layers():
    # wide stack: one 32 x 64 down-projection (M < n) -> padded, inert directions reported, still exact
    model, inputs = FAMILIES["bert"][0](0)
    with torch.no_grad():
        base = output_of(model, inputs)
    with pytest.warns(UserWarning, match="sigma = 0"):
        apply_frod(model, FrodConfig(target_modules=r"bert\.encoder\.layer\.\d+\.output\.dense",
                                     layers_to_transform=[0], sparse_rate=RATE))
    layers = dict(frod_layers(model))
    assert list(layers) == ["bert.encoder.layer.0.output.dense"]
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    (layer,) = layers.values()
    assert rel(layer.U @ torch.diag(layer.frod_sigma) @ layer.category.V.T, layer.base_layer.weight) < 1e-5
    perturb(model)
    with torch.no_grad():
        a = output_of(model, inputs)
        merge(model)
        assert rel(output_of(model, inputs), a) < 1e-5
    # rank-deficient stacks: a zero layer and a duplicated layer
    W = torch.randn(16, 16)
    basis = shared_basis([W, torch.zeros(16, 16), W.clone()], 1e-3, torch.float64)
    assert torch.all(basis.sigma[1] == 0)
    for Wi, s, U in zip([W, torch.zeros(16, 16), W], basis.sigma, basis.U or [None] * 3):
        Ui = U if U is not None else torch.nan_to_num((Wi.double() @ basis.V_inv_T) / s, posinf=0.0, neginf=0.0)
        assert torch.allclose(Ui @ torch.diag(s) @ basis.V.T, Wi.double(), atol=1e-10)
    # a stack of identical layers only (rank n, but T is degenerate)
    basis = shared_basis([W, W], 1e-3, torch.float64)
    assert torch.isfinite(basis.V).all()


def test_bf16_model_keeps_float32_trainables():
    model, inputs = FAMILIES["llama"][0](0)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        base = output_of(model, inputs)
    apply_frod(model, FrodConfig(target_modules=FAMILIES["llama"][1], sparse_rate=RATE))
    for _, layer in frod_layers(model):
        assert layer.frod_lambda.dtype == torch.float32 and layer.frod_s.dtype == torch.float32
        assert layer.category.V.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    model.to(torch.float16)  # casting the model leaves FRoD's tensors in float32
    assert all(l.frod_lambda.dtype == torch.float32 for _, l in frod_layers(model))
    model.to(torch.bfloat16)
    out = output_of(model, inputs)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(l.frod_s.grad is not None and l.frod_s.grad.dtype == torch.float32 for _, l in frod_layers(model))


def test_store_u_and_modes_agree():
    model, inputs, *_ = adapted("bert")
    perturb(model)
    with torch.no_grad():
        ref = output_of(model, inputs)
    model2, *_ = adapted("bert", store_u=True)
    perturb(model2)
    assert all(l.frod_U_t is not None for _, l in frod_layers(model2))
    for mode in ("materialize", "project"):
        for _, l in frod_layers(model2):
            l.mode = mode
        with torch.enable_grad():
            assert rel(output_of(model2, inputs).detach(), ref) < 1e-5


def test_agrees_with_upstream_peft_frod():
    """Give PEFT's FrodModel our basis, pattern and values: outputs agree (an implementation we did not write)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.frod.model import _category_from_key

    build, targets, _ = FAMILIES["bert"]
    ours, inputs, *_ = adapted("bert")
    perturb(ours)
    with torch.no_grad():
        expected = output_of(ours, inputs)
    base, _ = build(0)
    theirs = peft.get_peft_model(base, peft.FrodConfig(target_modules=targets, sparse_rate=RATE, progressbar=False))
    layers = dict(frod_layers(ours))
    done = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if not hasattr(module, "frod_lambda_l") or "default" not in getattr(module, "frod_lambda_l", {}):
                continue
            key = name.split("base_model.model.", 1)[-1]
            layer = layers[key]
            category = _category_from_key(key)
            theirs.base_model.frod_V[category]["default"] = layer.category.V.clone()
            theirs.base_model.frod_s_indices[category]["default"] = torch.stack([layer.category.rows, layer.category.cols]).long()
            module.frod_U["default"] = layer.U.detach().clone()
            module.frod_lambda_l["default"].data = layer.frod_lambda.detach().clone()
            module.frod_lambda_s_values["default"].data = layer.frod_s.detach().clone()
            done += 1
        assert done == len(layers)
        got = output_of(theirs, inputs)
    assert rel(got, expected) < 1e-5


def test_sharded_frod_holds_no_merged_weight_between_calls():
    """FrodMethod.before_sharding (called before FSDP shards the model): inside an evaluation each layer computes
    with W + dW but keeps none of it after its forward, where unsharded it keeps it for the next call."""
    from frod_cli.frod import evaluation_cache
    from frod_cli.methods import build_method, method_config

    model, x = adapted("llama")[:2]
    with torch.no_grad(), evaluation_cache(model):
        output_of(model, x)
        assert all(layer._held is not None for _, layer in frod_layers(model))
    build_method(method_config("frod")).before_sharding(model)
    with torch.no_grad(), evaluation_cache(model):
        output_of(model, x)
        assert all(layer._held is None for _, layer in frod_layers(model))
