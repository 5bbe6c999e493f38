"""Smoke tests of the benchmarks (frod_cli.bench, the command scripts/bench.py runs) on the tiny preset, in-process
(seconds; no timing targets are asserted here)."""
from __future__ import annotations

import json

import pytest
import torch

from frod_cli.bench.adapters import adapt_shape_only, check_names, frod_accumulation, parse_frod_method
from frod_cli.bench.cli import main

ROW_FIELDS = {"method", "step_s", "build_s", "trainable", "trainable_pct", "params_buffers_bytes",
              "params_buffers_vs_base", "optimizer_state_bytes", "memory", "init_max_abs_diff", "vs_full", "vs_peft_frod"}


def _run(tmp_path, methods, steps=2, extra=()):
    out = tmp_path / f"tiny-{methods}.json"
    rc = main(["--preset", "tiny", "--methods", methods, "--steps", str(steps), "--warmup", "1",
               "--threads", "1", "--out", str(out), "--quiet", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _check_common(res, methods):
    assert res["preset"] == "tiny"
    assert res["config"]["tokens_per_step"] == res["config"]["batch"] * res["config"]["seq"]
    assert res["base_params_buffers_bytes"] > 0
    assert "torch" in res["environment"] and "date_utc" in res["environment"]
    assert res["environment"]["compute_dtypes"] == {"float32": "native"}  # what its figures need of the CPU
    assert res["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == methods
    for r in rows.values():
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        for phase in ("forward", "backward", "optimizer", "total"):
            t = r["step_s"][phase]
            assert t["n"] == 2 and t["min"] <= t["median"] <= t["max"] and t["median"] > 0
        assert r["trainable"] > 0 and r["params_buffers_bytes"] > 0
        mem = r["memory"]
        assert {"rss_before", "rss_peak", "step_peak_extra", "state_bytes", "step_peak_bytes"} <= set(mem)
        assert mem["rss_peak"] >= mem["rss_before"] and mem["step_peak_extra"] >= 0
        assert r["vs_full"]["step"] > 0
        assert r["vs_peft_frod"] is None  # peft_frod not run here
    assert rows["full"]["vs_full"]["step"] == pytest.approx(1.0)
    return rows


TINY_METHODS = ["full", "lora", "dora", "frod", "frod:project"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of every kind of method on the tiny preset (the tests below read its JSON)."""
    return _run(tmp_path_factory.mktemp("bench"), ",".join(TINY_METHODS))


def test_bench_full_lora_json(tiny_run):
    res = tiny_run
    rows = _check_common(res, TINY_METHODS)
    assert rows["full"]["init_max_abs_diff"] is None
    assert rows["lora"]["init_max_abs_diff"] == 0.0 and rows["dora"]["init_max_abs_diff"] < 1e-5
    assert rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["dora"]["trainable"] > rows["lora"]["trainable"]  # DoRA adds a magnitude vector per layer
    assert rows["full"]["trainable"] == res["base_params"]
    assert rows["full"]["params_buffers_vs_base"] == pytest.approx(1.0)
    # AdamW keeps two moments per trainable value
    assert rows["full"]["optimizer_state_bytes"] >= 2 * 4 * rows["full"]["trainable"]


def test_bench_with_frod(tiny_run):
    rows = _check_common(tiny_run, TINY_METHODS)
    for m in ("frod", "frod:project"):
        assert rows[m]["init_max_abs_diff"] == 0.0, "FRoD must equal the base model exactly at init"
        assert rows[m]["trainable"] < rows["full"]["trainable"]


def test_frod_method_names(capsys):
    assert parse_frod_method("frod") == {"mode": "auto", "store_u": False}
    assert parse_frod_method("frod:materialize+u") == {"mode": "materialize", "store_u": True}
    assert parse_frod_method("frod:project") == {"mode": "project", "store_u": False}
    assert parse_frod_method("frod:window") == {"mode": "auto", "store_u": False}
    assert parse_frod_method("frod:materialize+u:window") == {"mode": "materialize", "store_u": True}
    assert frod_accumulation("frod") == "micro_batch"
    assert frod_accumulation("frod:project:micro_batch") == "micro_batch"
    assert frod_accumulation("frod:materialize+u:window") == "window"
    assert frod_accumulation("full") is None
    for bad in ("frod:fast", "frod:project:materialize"):
        with pytest.raises(SystemExit) as e:
            parse_frod_method(bad)
        assert e.value.code == 2
    capsys.readouterr()
    # bad names are refused in one line before anything is built
    for bad, says in (("peft_frod:offload", "runtime_offload_base_weight"), ("qlora", "unknown method 'qlora'")):
        with pytest.raises(SystemExit) as e:
            main(["--preset", "tiny", "--methods", f"full,{bad}", "--threads", "1", "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    check_names(["full", "lora", "dora", "pissa", "vera", "peft_frod", "frod:project+u:window"])


def test_bench_grad_accum_window(tmp_path):
    methods = ["full", "frod:micro_batch", "frod:window", "frod:materialize+u:window"]
    res = _run(tmp_path, ",".join(methods), extra=("--grad-accum", "3", "--probe-timed", "--interleave"))
    rows = _check_common(res, methods)
    c = res["config"]
    assert c["grad_accum"] == 3 and c["tokens_per_optimizer_step"] == 3 * c["tokens_per_micro_batch"]
    assert c["probe_timed"]
    assert rows["full"]["accumulation"] is None and rows["frod:micro_batch"]["accumulation"] == "micro_batch"
    assert rows["frod:micro_batch"]["window"] is None
    for m in ("frod:window", "frod:materialize+u:window"):
        r = rows[m]
        assert r["accumulation"] == "window" and r["grad_accum"] == 3
        w = r["window"]
        assert 0 < w["layers"] <= w["of"] and w["builds"] == w["layers"]
        assert w["grad_buffers"] > 0 and w["total"] == w["weights"] + w["grad_buffers"]
        assert r["step_s"]["window_exit"]["median"] > 0
        assert r["init_max_abs_diff"] == 0.0
    # stored U: the window pays off for every layer at K = 3 (materialize forced)
    assert rows["frod:materialize+u:window"]["window"]["layers"] == rows["frod:materialize+u:window"]["window"]["of"]


def test_shape_only_basis_is_read_from_the_cache_by_the_registry_method(monkeypatch, tmp_path):
    """The 4-bit benchmark's synthetic basis (V = V^-T = I, sigma_i = the column norms of W_i) reaches the model
    through the registry's frod reading a basis cache: every category from the cache, the model's output
    unchanged at init, and no entry left behind in the user's cache."""
    from types import SimpleNamespace

    from frod_cli.frod import basis_report, frod_layers
    from tiny_models import FAMILIES

    monkeypatch.setenv("FROD_BASIS_CACHE", str(tmp_path / "user-cache"))
    model, targets = FAMILIES["llama"][0]()[0], FAMILIES["llama"][1]
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    args = SimpleNamespace(sparse_rate=0.05, seed=0, lora_r=8)
    model, method = adapt_shape_only(model, args, targets)
    assert {r["source"] for r in basis_report(model)} == {"cache"}
    assert method.describe()["basis"]["computed"] == 0
    for _, layer in frod_layers(model):
        n = layer.in_features
        torch.testing.assert_close(layer.category.V, torch.eye(n), rtol=0, atol=0)
        torch.testing.assert_close(layer.frod_sigma, torch.linalg.vector_norm(layer.base_layer.weight, dim=0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert not (tmp_path / "user-cache").exists()
