"""Issue 26, part 1: the streamed FRoD basis (basis.streamed_basis), its layer sources (sources.py) and how
`apply_frod` picks it (build.choose_build, FrodConfig.basis_build).

Tolerances: the streamed factors equal the in-memory ones within 1e-9 (relative, Frobenius) in float64; in
float32 both are rounding away from the float64 factors by the same order, so they are compared with each
other within 2e-3 (V, V^-T: eigenvectors of close eigenvalues move most) and 2e-4 (sigma). A wide stack is
decomposed in memory by both builds: bit for bit. Everything else here (adapters from the module and from the
checkpoint, cached and recomputed) is bit for bit."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from frod_cli.frod import FrodConfig, FrodError, apply_frod, basis_report, frod_layers
from frod_cli.frod.basis import shared_basis, streamed_basis
from frod_cli.frod.build import choose_build, streamed_workspace_bytes, workspace_bytes
from frod_cli.frod.cache import entry_key, list_entries, source_key
from frod_cli.frod.sources import ModuleSource, TensorSource, checkpoint_sources
from tiny_models import FAMILIES, output_of

TARGETS = FAMILIES["llama"][1]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def signs(a, b) -> torch.Tensor:
    """Eigenvectors are defined up to sign: the column signs that align b's V with a's."""
    s = torch.sign((a.V.double() * b.V.double()).sum(0))
    return torch.where(s == 0, torch.ones_like(s), s)


def stack(*shapes, seed=0):
    """Layers with different column scales, so that the HO-GSVD's eigenvalues are apart."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g, dtype=torch.float64) * torch.linspace(0.5, 1.5 + i, n, dtype=torch.float64)
            for i, (m, n) in enumerate(shapes)]


def reconstruction(basis, W) -> float:
    """max_i |W_i - U_i diag(sigma_i) V^T| / |W_i|, U_i stored or recomputed from W_i V^-T as FrodLinear does."""
    worst = 0.0
    for i, w in enumerate(W):
        s = basis.sigma[i]
        U = basis.U[i] if basis.U is not None else (w.to(s.dtype) @ basis.V_inv_T) / torch.where(s > 0, s, 1)
        worst = max(worst, float((U @ torch.diag(s) @ basis.V.T - w.to(s.dtype)).norm() / w.norm().clamp_min(1e-30)))
    return worst


@pytest.mark.parametrize("dtype, tol_v, tol_sigma", [(torch.float64, 1e-9, 1e-9), (torch.float32, 2e-3, 2e-4)])
def test_streamed_factors_equal_the_in_memory_ones(dtype, tol_v, tol_sigma):
    # tall layers and, in the same category, wide ones (Woodbury): 3 x 96 + 2 x 40 = 368 rows of n = 64
    W = stack((96, 64), (40, 64), (96, 64), (40, 64), (96, 64))
    memory = shared_basis(W, 1e-3, dtype)
    streamed = streamed_basis(TensorSource(W), 1e-3, dtype)
    assert not memory.rank_deficient and not streamed.rank_deficient
    s = signs(memory, streamed)
    assert streamed.V.dtype == dtype and rel(streamed.V * s, memory.V) < tol_v
    assert rel(streamed.V_inv_T * s, memory.V_inv_T) < tol_v
    assert max(rel(a, b) for a, b in zip(streamed.sigma, memory.sigma)) < tol_sigma
    assert reconstruction(streamed, W) < (1e-12 if dtype == torch.float64 else 1e-5)
    # the HO-GSVD's own fact: sum_i sigma_ik^2 = 1 for every direction k (Q orthonormal)
    assert torch.allclose(torch.stack(streamed.sigma).double().pow(2).sum(0), torch.ones(64, dtype=torch.float64),
                          atol=1e-10 if dtype == torch.float64 else 1e-4)


def edge_stacks():
    W = stack((48, 32))[0]
    low = stack((48, 6))[0] @ stack((6, 32), seed=1)[0]  # rank 6 of 32
    return {
        "zero_layer": [W, torch.zeros(48, 32, dtype=torch.float64), W * 0.5 + 1],
        "duplicated": [W, W.clone()],
        "all_zero": [torch.zeros(40, 32, dtype=torch.float64)],
        "rank_deficient": [low, 2 * low],
        "wide_stack": [W[:10], W[10:25]],  # 25 rows of n = 32: held whole, as in memory
    }


@pytest.mark.parametrize("case", list(edge_stacks()))
def test_rank_deficient_duplicated_zero_and_wide_stacks(case):
    W = edge_stacks()[case]
    basis = streamed_basis(TensorSource(W), 1e-3, torch.float64)
    assert all(torch.isfinite(t).all() for t in [basis.V, *basis.sigma, *(basis.U or [])])
    scale = max(float(w.norm()) for w in W)
    for i, w in enumerate(W):  # W_i = U_i diag(sigma_i) V^T, the U_i stored or recomputed
        s = basis.sigma[i]
        U = basis.U[i] if basis.U is not None else (w @ basis.V_inv_T) / torch.where(s > 0, s, 1)
        assert float((U @ torch.diag(s) @ basis.V.T - w).norm()) <= 1e-9 * max(scale, 1.0), (case, i)
    if case == "zero_layer":
        assert torch.all(basis.sigma[1] == 0)
    if case in ("all_zero", "rank_deficient"):
        assert basis.rank_deficient and basis.U is not None
    if case == "wide_stack":
        memory = shared_basis(W, 1e-3, torch.float64)
        assert torch.equal(basis.V, memory.V) and all(torch.equal(a, b) for a, b in zip(basis.U, memory.U))


def adapted(model=None, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FRoD category")  # the wide down_proj stack's inert directions
        build = kw.pop("basis_build", "streamed")
        return apply_frod(model if model is not None else FAMILIES["llama"][0]()[0],
                          FrodConfig(target_modules=TARGETS, sparse_rate=0.05, layers_to_transform=[0, 1],
                                     basis_build=build), **kw)


def assert_same_adapter(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_the_streamed_adapter_equals_its_base_at_initialization_and_merges(caplog):
    model, inputs = FAMILIES["llama"][0]()
    with torch.no_grad():
        base = output_of(model, inputs)
    with caplog.at_level(logging.INFO, logger="frod.basis"):
        adapted(model)
    assert "7 computed (7 streamed, 0 in memory)" in caplog.text
    assert {r["build"] for r in basis_report(model)} == {"streamed"}
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
        for _, layer in frod_layers(model):
            layer.frod_lambda.add_(0.05 * layer.frod_sigma.mean())
        changed = output_of(model, inputs)
        assert not torch.equal(changed, base)
        for _, layer in frod_layers(model):
            layer.merge()
        assert rel(output_of(model, inputs), changed) < 1e-5


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_the_checkpoint_source_equals_the_module_source_bit_for_bit(tmp_path, family, dtype):
    """The safetensors files read lazily (GPT-2's Conv1D weights transposed on the way; a bfloat16 file read into a
    float32 model) give the module source's bytes: the same cache key, the same adapter."""
    build, targets, _ = FAMILIES[family]
    saved = build()[0]
    saved.to(dtype).save_pretrained(tmp_path)
    model = type(saved).from_pretrained(tmp_path, dtype=torch.float32)
    config = FrodConfig(target_modules=targets, sparse_rate=0.05, basis_build="streamed")
    from frod_cli.frod.adapter import find_targets, group_categories

    groups = group_categories(find_targets(model, config))
    files = checkpoint_sources(groups, tmp_path)
    for key, members in groups.items():
        assert source_key(key, files[key], 1e-3, "float32", True) == \
            source_key(key, ModuleSource(members), 1e-3, "float32", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_files = apply_frod(type(saved).from_pretrained(tmp_path, dtype=torch.float32), config,
                                weights_from=tmp_path)
        assert_same_adapter(from_files, apply_frod(model, config))


def test_a_model_on_the_meta_device_gets_its_factors_from_the_checkpoint(tmp_path):
    """A process that holds no weights (a meta-device model, as FSDP's non-loading ranks start) builds the bases
    from the files, on the CPU: the loaded model's bases, bit for bit."""
    from transformers import LlamaForCausalLM

    from frod_cli.frod.adapter import find_targets, group_categories
    from frod_cli.frod.build import build_bases

    loaded = FAMILIES["llama"][0]()[0]
    loaded.save_pretrained(tmp_path)
    with torch.device("meta"):
        empty = LlamaForCausalLM(loaded.config)
    config = FrodConfig(target_modules=TARGETS, layers_to_transform=[0, 1], basis_build="streamed")
    groups = group_categories(find_targets(empty, config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = build_bases(groups, 1e-3, "float32", "fp", build="streamed",
                             sources=checkpoint_sources(groups, tmp_path))
        want, _ = build_bases(group_categories(find_targets(loaded, config)), 1e-3, "float32", "fp", build="streamed")
    for key, basis in want.items():
        assert got[key].V.device.type == "cpu" and torch.equal(got[key].V, basis.V), key
        assert all(torch.equal(a, b) for a, b in zip(got[key].sigma, basis.sigma))


def test_the_checkpoint_source_refuses_what_is_not_the_model(tmp_path):
    FAMILIES["llama"][0]()[0].save_pretrained(tmp_path)
    other = FAMILIES["llama"][0]()[0]
    other.model.layers[0].mlp.gate_proj = torch.nn.Linear(32, 96, bias=False)
    with pytest.raises(FrodError, match="the checkpoint's model.layers.0.mlp.gate_proj is 80 x 32"):
        adapted(other, weights_from=tmp_path)
    with pytest.raises(FrodError, match="holds no safetensors checkpoint"):
        adapted(weights_from=tmp_path / "nowhere")


def test_streamed_entries_hit_and_miss_apart_from_in_memory_ones(basis_cache):
    cold = adapted(cache_dir=basis_cache)
    assert {r["source"] for r in basis_report(cold)} == {"computed"} and len(list_entries(basis_cache)) == 7
    hit = adapted(cache_dir=basis_cache)
    assert {(r["source"], r["build"]) for r in basis_report(hit)} == {("cache", "streamed")}
    assert_same_adapter(cold, hit)
    assert_same_adapter(cold, adapted())  # a hit is the streamed build itself, bit for bit
    memory = adapted(cache_dir=basis_cache, basis_build="memory")  # the streamed entries do not stand for it
    # the wide down_proj stack is decomposed in memory by both: its streamed entry holds the same bytes
    assert {r["source"] for r in basis_report(memory)} == {"computed"} and len(list_entries(basis_cache)) == 14
    assert_same_adapter(memory, adapted(basis_build="memory"))
    assert {e["build"] for e in list_entries(basis_cache)} == {"memory", "streamed"}


def test_the_in_memory_key_is_the_one_entries_had_before():
    """Entries written before the streamed build existed still hit: the in-memory key is unchanged."""
    import hashlib
    import json

    W = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    h = hashlib.sha256(b"frod-basis:1:1")
    h.update(json.dumps(["q|in=4", float(1e-3).hex(), "float32"]).encode())
    for name, w in zip("ab", W):
        h.update(json.dumps([name, [6, 4], "torch.float32"]).encode())
        h.update(hashlib.sha256(w.numpy().tobytes()).digest())
    assert entry_key("q|in=4", ["a", "b"], W, 1e-3, "float32") == h.hexdigest()
    assert entry_key("q|in=4", ["a", "b"], W, 1e-3, "float32", streamed=True) != h.hexdigest()


def test_auto_takes_memory_where_it_fits_and_streams_where_it_does_not(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    gate7, gate70 = [(11008, 4096)] * 32, [(28672, 8192)] * 80
    f32 = torch.float32
    # the streamed workspace does not grow with the layers (but for sigma, N n): 70B's gate_proj under 5 GB
    assert streamed_workspace_bytes(gate70, f32) < 5e9 < workspace_bytes(gate7, f32)
    assert abs(streamed_workspace_bytes(gate70, f32) - streamed_workspace_bytes(gate70[:2], f32)) < 3e6
    free = {"cuda": 80e9, "cpu": 24e9}
    monkeypatch.setattr("frod_cli.frod.build.device_free_bytes", lambda d: free[d.type])
    assert choose_build("auto", gate7, f32, cuda) == ("memory", cuda)
    assert choose_build("auto", gate70, f32, cuda) == ("streamed", cuda)
    assert choose_build("auto", gate7, f32, cpu) == ("streamed", cpu)  # 31.5 GB does not fit 24 GB
    assert choose_build("streamed", gate7, f32, cuda) == ("streamed", cuda)
    with pytest.warns(UserWarning, match="more than cuda:0 has free: decomposing it memory on the CPU"):
        assert choose_build("memory", gate70, f32, cuda) == ("memory", cpu)
    free["cpu"] = 8e4  # a tiny LLaMA's q_proj stack does not fit in memory (81 kB), streamed it does (49 kB)
    with caplog.at_level(logging.INFO, logger="frod.basis"):
        model = adapted(basis_build="auto")
    assert {r["category"].split(".")[-1].split("|")[0]: r["build"] for r in basis_report(model)}["q_proj"] == \
        "streamed"
    assert "streamed" in caplog.text


def test_basis_build_is_checked_first(cfg_debug):
    from omegaconf import open_dict

    from frod_cli import FrodCliError
    from frod_cli.methods import build_method

    with pytest.raises(FrodError, match="basis_build must be one of auto, memory, streamed"):
        FrodConfig(target_modules=["q_proj"], basis_build="stream")
    with open_dict(cfg_debug):
        cfg_debug.method.basis_build = "stream"
    with pytest.raises(FrodCliError, match="method.basis_build must be one of auto, memory, streamed"):
        build_method(cfg_debug.method, None, cfg_debug.model)


def test_a_sharded_weight_is_gathered_one_layer_at_a_time(tmp_path):
    """A DTensor weight (FSDP2's sharded parameter) is read whole through full_tensor(); its source is collective."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(32, 48, bias=False)
        W = layer.weight.detach().clone()
        mesh = init_device_mesh("cpu", (1,))
        layer.weight = torch.nn.Parameter(distribute_tensor(W, mesh, [Shard(0)]), requires_grad=False)
        source = ModuleSource([("layer", layer)])
        assert source.collective and source.shapes == [(48, 32)]
        assert torch.equal(source.layer(0), W)
        assert torch.equal(torch.cat(list(source.blocks(0, 20))), W)
        basis = streamed_basis(source, 1e-3, torch.float64)
        assert reconstruction(basis, [W.double()]) < 1e-12
    finally:
        dist.destroy_process_group()


def test_the_streamed_build_benchmark_runs_on_tiny_shapes(tmp_path, capsys):
    """scripts/bench.py --build --build-mode: a point (its own process) reaches the JSON and the table; nothing
    timed is asserted. A bad --build-mode is refused in one line."""
    import json

    from frod_cli.bench.cli import main

    out = tmp_path / "stream.json"
    assert main(["--build", "--build-shape", "tiny", "--blocks", "3", "--build-mode", "streamed", "--targets",
                 "gate_proj", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["memory"]["rows"]
    assert (row["blocks"], row["build"], row["weights_bytes"]) == (3, "streamed", 3 * 160 * 64 * 2)
    assert row["peak_bytes"] >= row["rss_loaded_bytes"] > row["weights_bytes"]
    assert "| tiny | gate_proj | 3 | streamed |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--build", "--build-mode", "stream", "--out", str(out)])
    assert e.value.code == 2 and "--build-mode takes a comma list of memory, streamed" in capsys.readouterr().err
