"""Smoke tests of scripts/bench.py on the tiny preset (seconds; no timing targets are asserted here)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("frod_bench", REPO / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["frod_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


ROW_FIELDS = {"method", "step_s", "build_s", "trainable", "trainable_pct", "params_buffers_bytes",
              "params_buffers_vs_base", "optimizer_state_bytes", "memory", "init_max_abs_diff", "vs_full", "vs_peft_frod"}


def _run(tmp_path, methods, steps=2, extra=()):
    bench = _bench()
    out = tmp_path / "tiny.json"
    rc = bench.main(["--preset", "tiny", "--methods", methods, "--steps", str(steps), "--warmup", "1",
                     "--threads", "1", "--out", str(out), "--quiet", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _check_common(res, methods):
    assert res["preset"] == "tiny"
    assert res["config"]["tokens_per_step"] == res["config"]["batch"] * res["config"]["seq"]
    assert res["base_params_buffers_bytes"] > 0
    assert "torch" in res["environment"] and "date_utc" in res["environment"]
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


def test_bench_full_lora_json(tmp_path):
    res = _run(tmp_path, "full,lora")
    rows = _check_common(res, ["full", "lora"])
    assert rows["full"]["init_max_abs_diff"] is None
    assert rows["lora"]["init_max_abs_diff"] == 0.0
    assert rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["full"]["trainable"] == res["base_params"]
    assert rows["full"]["params_buffers_vs_base"] == pytest.approx(1.0)
    # AdamW keeps two moments per trainable value
    assert rows["full"]["optimizer_state_bytes"] >= 2 * 4 * rows["full"]["trainable"]


def test_bench_with_frod(tmp_path):
    why = _bench().frod_available()
    if why:
        pytest.skip(why)
    res = _run(tmp_path, "full,frod,frod:project")
    rows = _check_common(res, ["full", "frod", "frod:project"])
    for m in ("frod", "frod:project"):
        assert rows[m]["init_max_abs_diff"] == 0.0, "FRoD must equal the base model exactly at init"
        assert rows[m]["trainable"] < rows["full"]["trainable"]


def test_frod_method_names():
    bench = _bench()
    assert bench.parse_frod_method("frod") == {"mode": "auto", "store_u": False}
    assert bench.parse_frod_method("frod:materialize+u") == {"mode": "materialize", "store_u": True}
    assert bench.parse_frod_method("frod:project") == {"mode": "project", "store_u": False}
    assert bench.parse_frod_method("frod:window") == {"mode": "auto", "store_u": False}
    assert bench.parse_frod_method("frod:materialize+u:window") == {"mode": "materialize", "store_u": True}
    assert bench.frod_accumulation("frod") == "micro_batch"
    assert bench.frod_accumulation("frod:project:micro_batch") == "micro_batch"
    assert bench.frod_accumulation("frod:materialize+u:window") == "window"
    assert bench.frod_accumulation("full") is None
    with pytest.raises(SystemExit):
        bench.parse_frod_method("frod:fast")
    with pytest.raises(SystemExit):
        bench.parse_frod_method("frod:project:materialize")


def test_bench_grad_accum_window(tmp_path):
    why = _bench().frod_available()
    if why:
        pytest.skip(why)
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
