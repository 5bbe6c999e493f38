"""Issue 17: the FRoD bases on the run's device, split over the ranks of a distributed launch, and kept in
the basis cache (frod_cli/frod/build.py, cache.py).

Every comparison here is bit for bit: a cached adapter, a recomputed one and one built by two processes
are the same tensors. The model is the tiny LLaMA of tests/tiny_models.py on blocks 0 and 1, so that one
category (down_proj: two 32 x 80 layers, a wide stack) keeps its U_i and the others recompute it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frod_cli.frod import FrodConfig, apply_frod, basis_report
from frod_cli.frod.basis import decomposition_cost
from frod_cli.frod.build import assign_ranks
from frod_cli.frod.cache import clear_cache, entry_key, list_entries
from tiny_models import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
TARGETS = FAMILIES["llama"][1]
DOWN = "model.layers.*.mlp.down_proj|in=80"
Q = "model.layers.*.self_attn.q_proj|in=32"


def config(**kw) -> FrodConfig:
    return FrodConfig(target_modules=TARGETS, sparse_rate=0.05, seed=0, layers_to_transform=[0, 1], **kw)


def base():
    return FAMILIES["llama"][0]()[0]


def adapted(model=None, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FRoD category")  # the wide stack's inert directions
        return apply_frod(base() if model is None else model, config(), **kw)


def assert_same_adapter(a, b) -> None:
    """Every buffer (V, V^-T, pattern, sigma, stored U) and parameter, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def entry_of(cache: Path, category: str) -> Path:
    [entry] = [e for e in list_entries(cache) if e["category"] == category]
    return Path(entry["file"])


def test_cached_adapter_equals_the_uncached_one_bit_for_bit(basis_cache):
    fresh = adapted()
    cold = adapted(cache_dir=basis_cache, device="cpu")
    assert {r["source"] for r in basis_report(cold)} == {"computed"}
    assert len(list_entries(basis_cache)) == 7
    hit = adapted(cache_dir=basis_cache)
    assert {r["source"] for r in basis_report(hit)} == {"cache"}
    assert all(r["seconds"] == 0.0 and r["hash_s"] > 0 for r in basis_report(hit))
    assert_same_adapter(fresh, cold)
    assert_same_adapter(fresh, hit)
    # the wide category's U went through the cache too
    assert hit.get_submodule("model.layers.0.mlp.down_proj").frod_U_t is not None
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hit(input_ids=x).logits, base()(input_ids=x).logits)


def test_one_changed_weight_misses_and_gives_the_fresh_decomposition(basis_cache):
    adapted(cache_dir=basis_cache)
    changed = base()
    with torch.no_grad():
        changed.model.layers[1].self_attn.q_proj.weight[3, 5] += 1e-3
    again = adapted(changed, cache_dir=basis_cache)
    sources = {r["category"]: r["source"] for r in basis_report(again)}
    assert sources.pop(Q) == "computed" and set(sources.values()) == {"cache"}
    reference = base()
    with torch.no_grad():
        reference.model.layers[1].self_attn.q_proj.weight[3, 5] += 1e-3
    assert_same_adapter(again, adapted(reference))
    V = lambda m: m.get_submodule("model.layers.0.self_attn.q_proj").category.V  # noqa: E731
    assert not torch.equal(V(again), V(adapted()))
    assert len(list_entries(basis_cache)) == 8  # the new entry beside the old one


def test_the_key_covers_every_element_the_names_and_the_settings():
    W = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    key = entry_key("q|in=4", ["a", "b"], W, 1e-3, "float32")
    assert entry_key("q|in=4", ["a", "b"], [w.clone() for w in W], 1e-3, "float32") == key
    bumped = [W[0], W[1].clone()]
    bumped[1][5, 3] = torch.nextafter(bumped[1][5, 3], torch.tensor(1e9))  # the last element, one ulp
    assert entry_key("q|in=4", ["a", "b"], bumped, 1e-3, "float32") != key
    assert entry_key("q|in=4", ["a", "c"], W, 1e-3, "float32") != key
    assert entry_key("q|in=4", ["a", "b"], W, 2e-3, "float32") != key
    assert entry_key("q|in=4", ["a", "b"], W, 1e-3, "float64") != key
    assert entry_key("q|in=4", ["a", "b"], [w.to(torch.bfloat16) for w in W], 1e-3, "float32") != key


def damage(path: Path, how: str, cache: Path) -> None:
    data = path.read_bytes()
    if how == "flipped_byte":
        path.write_bytes(data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:])  # inside the last tensor
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # another category's entry under this key
        path.write_bytes(entry_of(cache, Q).read_bytes())


@pytest.mark.parametrize("how, message", [("flipped_byte", "is corrupt"), ("truncated", "is unreadable"),
                                          ("other_entry", "holds another category's basis")])
def test_a_damaged_entry_is_recomputed_with_a_warning(basis_cache, how, message):
    adapted(cache_dir=basis_cache)
    path = entry_of(basis_cache, DOWN)  # the entry with a stored U
    damage(path, how, basis_cache)
    with pytest.warns(UserWarning, match=message):
        again = adapted(cache_dir=basis_cache)
    sources = {r["category"]: r["source"] for r in basis_report(again)}
    assert sources.pop(DOWN) == "computed" and set(sources.values()) == {"cache"}
    assert_same_adapter(again, adapted())
    # rewritten whole: the next run trusts it again
    assert {r["source"] for r in basis_report(adapted(cache_dir=basis_cache))} == {"cache"}


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="cannot write"):
        model = adapted(cache_dir=blocker / "cache")
    assert_same_adapter(model, adapted())


def test_list_and_clear_touch_only_entries(basis_cache):
    adapted(cache_dir=basis_cache)
    (basis_cache / "model.safetensors").write_bytes(b"a user's file")
    entries = list_entries(basis_cache)
    assert len(entries) == 7 and {e["base"] for e in entries} == {"LlamaForCausalLM"}
    down = next(e for e in entries if e["category"] == DOWN)
    assert down["rank_deficient"] == "true" and down["layers"] == ["model.layers.0.mlp.down_proj",
                                                                    "model.layers.1.mlp.down_proj"]
    assert clear_cache(basis_cache, base="another model") == (0, 0)
    removed, freed = clear_cache(basis_cache)
    assert removed == 7 and freed == sum(e["bytes"] for e in entries)
    assert [p.name for p in basis_cache.iterdir()] == ["model.safetensors"]


def test_method_basis_cache_false_writes_nothing(cfg_debug, basis_cache):
    from omegaconf import open_dict

    from frod_cli.methods import build_method

    def adapt(flag: bool):
        with open_dict(cfg_debug):
            cfg_debug.method.basis_cache = flag
        method = build_method(cfg_debug.method, None, cfg_debug.model)
        method.adapt(FAMILIES["bert"][0]()[0])
        return method.describe()["basis"]

    assert adapt(False) == {"categories": 7, "cache_hits": 0, "computed": 7, "streamed": 0,
                            "compute_s": pytest.approx(0, abs=5), "processes": 1, "cache_dir": None}
    assert list(basis_cache.iterdir()) == []
    assert adapt(True)["cache_dir"] == str(basis_cache) and len(list(basis_cache.iterdir())) == 7


def test_ranks_get_the_largest_categories_first_and_balanced():
    assert assign_ranks({"a": 10, "b": 9, "c": 3, "d": 2, "e": 1}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    # LLaMA-2-7B's six categories: gate and up (2.7x taller) go to different ranks, the loads within 10%
    shapes = {k: [(4096, 4096)] * 32 for k in "qkvo"} | {k: [(11008, 4096)] * 32 for k in ("gate", "up")}
    costs = {k: decomposition_cost(s) for k, s in shapes.items()}
    owner = assign_ranks(costs, 2)
    assert owner["gate"] != owner["up"]
    loads = [sum(c for k, c in costs.items() if owner[k] == r) for r in (0, 1)]
    assert max(loads) / sum(loads) < 0.55
    assert set(assign_ranks(costs, 8).values()) == set(range(6))  # more ranks than categories: one each


@pytest.mark.slow
def test_a_category_too_large_for_the_device_goes_to_the_cpu():
    """The device budget of one category: LLaMA-2-7B's gate_proj (32 x 11008 x 4096) fits an 80 GB GPU, 70B's
    (80 x 28672 x 8192: the float32 stack alone is 75 GB) does not fit even 141 GB and is decomposed on the CPU."""
    from frod_cli.frod.build import fits_on, workspace_bytes

    gate7 = workspace_bytes([(11008, 4096)] * 32, torch.float32)
    gate70 = workspace_bytes([(28672, 8192)] * 80, torch.float32)
    assert 25e9 < gate7 < 35e9 and gate70 > 300e9  # 31.5 GB and 399 GB
    cuda = torch.device("cuda", 0)
    assert fits_on(cuda, gate7, free_bytes=80e9) and not fits_on(cuda, gate70, free_bytes=141e9)
    assert not fits_on(cuda, gate7, free_bytes=30e9)  # a tenth kept free
    cpu = torch.device("cpu")
    assert fits_on(cpu, gate7, free_bytes=40e9) and not fits_on(cpu, gate7, free_bytes=35e9)  # a fifth kept free


def test_frod_train_twice_reports_the_cache_hit(tmp_path, debug_args, basis_cache):
    from frod_cli.cli import run_verb

    runs = []
    for name in ("first", "second"):
        code, _ = run_verb("train", [*debug_args, f"hydra.run.dir={tmp_path / name}"])
        assert code == 0
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    first, second = (m["method_details"]["basis"] for m in runs)
    assert (first["cache_hits"], first["computed"]) == (0, 7) and first["cache_dir"] == str(basis_cache)
    assert (second["cache_hits"], second["computed"]) == (7, 0)
    assert "7 from the cache" in (tmp_path / "second" / "train.log").read_text()
    # the same adapter, so the same training
    assert runs[0]["rank_fingerprints"] == runs[1]["rank_fingerprints"]
    assert runs[0]["validation"] == runs[1]["validation"]


TWO_PROCESS_SCRIPT = r'''
import json, sys, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_basis_cache import adapted, base, config
from frod_cli.frod import FrodError, apply_frod, basis_report, save_adapter

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, out, cache = dist.get_rank(), sys.argv[1], sys.argv[3]
reports = {}
for phase, cache_dir in (("plain", None), ("cold", cache), ("hit", cache)):
    model = adapted(cache_dir=cache_dir)
    save_adapter(model, f"{out}/{phase}-{rank}")
    reports[phase] = basis_report(model)
import warnings
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="FRoD category")
    model = apply_frod(base(), config(basis_build="streamed"))
save_adapter(model, f"{out}/streamed-{rank}")
reports["streamed"] = basis_report(model)
# sharded weights (DTensor, as FSDP2 holds them): every rank gathers each layer and builds every category
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from frod_cli.frod.adapter import find_targets, group_categories
from frod_cli.frod.build import build_bases
from frod_cli.frod.cache import BasisCache
mesh = init_device_mesh("cpu", (2,))
groups = group_categories(find_targets(base(), config()))
for members in groups.values():
    for _, m in members:
        m.weight = torch.nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
for phase in ("sharded-cold", "sharded-hit"):
    bases, reports[phase] = build_bases(groups, 1e-3, "float32", "fp", build="streamed", cache=BasisCache(cache))
    save_file({f"{k}.{name}": t.contiguous() for k, b in bases.items() for name, t in
               [("V", b.V), ("sigma", torch.stack(b.sigma))] + ([("V_inv_T", b.V_inv_T)] if b.U is None else [])},
              f"{out}/{phase}-{rank}.safetensors")
try:  # rank 1 asks for another regularization: refused on both ranks, no hang
    apply_frod(base(), config(regularization=1e-3 if rank == 0 else 2e-3))
    reports["mismatch"] = "accepted"
except FrodError as e:
    reports["mismatch"] = str(e)
import frod_cli.frod.build as build
if rank == 1:  # rank 1's share fails: both ranks stop with an error instead of waiting for its broadcast
    def refuse(*args, **kwargs):
        raise FrodError("refused on purpose")
    build.decompose = refuse
try:
    adapted()
    reports["failure"] = "accepted"
except FrodError as e:
    reports["failure"] = str(e)
json.dump(reports, open(f"{out}/report-{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_split_the_categories_and_equal_one_process(tmp_path, basis_cache):
    """torchrun, 2 processes x 1 thread over gloo, against one process at 1 thread: every category is
    computed by one rank (or read from the cache by it) and broadcast; both ranks end with one process's
    adapter, bit for bit, with and without the cache, in memory and streamed."""
    from safetensors.torch import load_file

    from frod_cli.frod import save_adapter

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), str(ROOT / "tests"), str(basis_cache)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        save_adapter(adapted(), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    import warnings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="FRoD category")
            save_adapter(apply_frod(base(), config(basis_build="streamed")), tmp_path / "one-streamed")
    finally:
        torch.set_num_threads(threads)
    one = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    one_streamed = load_file(str(tmp_path / "one-streamed" / "adapter.safetensors"))
    assert not all(torch.equal(one[k], one_streamed[k]) for k in one)  # two builds, differing by rounding
    for phase in ("plain", "cold", "hit", "streamed"):
        for rank in (0, 1):
            got = load_file(str(tmp_path / f"{phase}-{rank}" / "adapter.safetensors"))
            want = one_streamed if phase == "streamed" else one
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), (phase, rank)
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1)]
    for rep in reports:
        assert {r["rank"] for r in rep["plain"]} == {0, 1}  # both ranks computed a share
        assert {r["source"] for r in rep["cold"]} == {"computed"} and {r["source"] for r in rep["hit"]} == {"cache"}
        assert {r["build"] for r in rep["streamed"]} == {"streamed"} and {r["build"] for r in rep["plain"]} == {"memory"}
        assert {r["rank"] for r in rep["streamed"]} == {0, 1}
        assert "the processes adapt different models" in rep["mismatch"]
    assert "another process refused" in reports[0]["failure"] and reports[1]["failure"] == "refused on purpose"
    for rep in reports:  # sharded: each rank built every category itself, the second time from the cache
        assert {(r["rank"] == rep["sharded-cold"][0]["rank"], r["source"]) for r in rep["sharded-cold"]} == \
            {(True, "computed")} and {r["source"] for r in rep["sharded-hit"]} == {"cache"}
    from frod_cli.frod.adapter import find_targets, group_categories
    from frod_cli.frod.build import build_bases

    torch.set_num_threads(1)
    try:
        plain, _ = build_bases(group_categories(find_targets(base(), config())), 1e-3, "float32", "fp",
                               build="streamed")
    finally:
        torch.set_num_threads(threads)
    for phase in ("sharded-cold", "sharded-hit"):
        for rank in (0, 1):
            got = load_file(str(tmp_path / f"{phase}-{rank}.safetensors"))
            for k, b in plain.items():
                assert torch.equal(got[f"{k}.V"], b.V) and torch.equal(got[f"{k}.sigma"], torch.stack(b.sigma)), k
    owners = [[(r["category"], r["rank"]) for r in rep["plain"]] for rep in reports]
    assert owners[0] == owners[1]  # one plan on both ranks
    # each entry written once, by the rank that computed it (sharded: by rank 0); the streamed ones key apart
    assert sorted(e["build"] for e in list_entries(basis_cache)) == ["memory"] * 7 + ["streamed"] * 7


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decomposition_on_the_gpu_lands_where_the_model_is():
    """A CPU model, bases computed on the GPU: the factors come back to the CPU, the adapted model still
    equals the base model, and the factors agree with the CPU's up to rounding (eigenvector signs aside)."""
    model = adapted(device="cuda")
    cpu = adapted()
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert all(r["device_peak_bytes"] > 0 for r in basis_report(model))
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base()(input_ids=x).logits, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.named_buffers(), cpu.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a.abs(), b.abs(), rtol=1e-3, atol=1e-4, msg=name)


def test_frod_cache_verb_lists_and_clears(basis_cache, capsys):
    from frod_cli.cli import run_verb

    adapted(cache_dir=basis_cache)
    code, listing = run_verb("cache", [])
    out = capsys.readouterr().out
    assert code == 0 and len(listing["entries"]) == 7
    assert f"FRoD basis cache {basis_cache}: 7 entries" in out and "base LlamaForCausalLM" in out
    assert "model.layers.*.mlp.down_proj|in=80  2 layers, n=80, float32, regularization 0.001, U stored" in out
    assert run_verb("cache", ["clear", "base=another"])[1]["removed"] == 0
    code, cleared = run_verb("cache", ["clear", "base=LlamaForCausalLM"])
    assert code == 0 and cleared["removed"] == 7 and list(basis_cache.iterdir()) == []
    assert run_verb("cache", ["purge"])[0] == 2
    assert "the actions are list and clear" in capsys.readouterr().err


def test_frod_cache_list_names_a_4bit_base_by_its_given_name_and_counts_what_it_lists(basis_cache, capsys):
    """A tiny LLaMA loaded in NF4 (through a temporary folder, the way transformers quantizes) is listed as the
    user named it (`tiny:llama`), and the header counts exactly the entries listed, a damaged file included."""
    from omegaconf import OmegaConf

    from frod_cli.cli import run_verb
    from frod_cli.config import ModelConfig
    from frod_cli.training import builders as B
    from conftest import compose_train

    cfg = compose_train(["recipe=qfrod_smoke"])
    task = B.build_task(cfg.task, 0)
    model, _ = B.load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama", quantization="nf4")), task)
    adapted(model, cache_dir=basis_cache)
    (basis_cache / f"{'0' * 64}.safetensors").write_bytes(b"not a safetensors file")
    code, listing = run_verb("cache", [])
    lines = [l for l in capsys.readouterr().out.strip().splitlines() if not l.startswith("[")]  # not log records
    assert code == 0 and len(listing["entries"]) == 8
    assert lines[0].startswith(f"FRoD basis cache {basis_cache}: 8 entries") and "(1 damaged)" in lines[0]
    assert [l for l in lines if l.startswith("base ")] == [next(l for l in lines if l.startswith("base tiny:llama "))]
    assert "7 entries" in lines[1] and "frod-4bit" not in "\n".join(lines)
    assert sum(l.startswith(("  ", "damaged: ")) for l in lines) == 8


@pytest.mark.slow
def test_bench_build_on_tiny_shapes(tmp_path, capsys):
    """The basis-build benchmark (scripts/bench.py --build: cold, cache hit, 2 processes against 1) runs end to
    end and its JSON holds what docs/PERFORMANCE.md quotes; no timing is asserted. In-process; its ranks part
    starts torchrun."""
    from frod_cli.bench.cli import main

    out = tmp_path / "build.json"
    assert main(["--build", "--build-shape", "tiny", "--blocks", "2,3", "--ranks", "2", "--threads", "1", "--quiet",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [p["blocks"] for p in res["points"]] == [2, 3]
    last = res["points"][-1]
    assert len(last["rows"]) == 6 and last["hit_equals_cold"] is True
    assert {row["hit_source"] for row in last["rows"]} == {"cache"} and last["cache_bytes"] > 0
    assert set(res["extrapolated"]) == {"32", "80"} and len(res["extrapolated"]["80"]) == 6
    assert res["ranks"]["bit_identical"] is True and set(res["ranks"]["owners"].values()) == {0, 1}
    assert "| all |" in capsys.readouterr().out


def test_the_base_fingerprint_reads_large_layers():
    """A layer of more than 2^24 elements (here 4097 x 4096; LLaMA-7B's gate_proj is 11008 x 4096): the
    strided sample's last index stays inside the weight (float32 linspace rounded it one past the end)."""
    from frod_cli.frod.adapter import fingerprint_weights

    layer = torch.nn.Linear(4096, 4097, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        first = fingerprint_weights([("big", layer)])
        layer.weight[-1, -1] = 1.0  # the last element is in the sample
    assert fingerprint_weights([("big", layer)]) != first
