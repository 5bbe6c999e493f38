"""frod_cli/precision.py: what the CPU computes fast, model.dtype=auto and a 4-bit base's compute dtype. The CPU's
answer is forced (monkeypatched) where a test needs one, so every test holds on any CPU; one test caps oneDNN at
AVX2 in a subprocess, which is how an AVX2 machine answers."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import compose_train
from frod_cli import FrodCliError
from frod_cli import precision as P


@pytest.fixture
def emulated(monkeypatch):
    """The issue's machine: torch reports AVX2, bfloat16 and float16 matmuls run on the scalar fallback."""
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(P, "cpu_native", lambda name: name == "float32")
    monkeypatch.setattr(P, "cpu_slowdown", lambda name: 380.0)


@pytest.fixture
def native(monkeypatch):
    """A CPU with oneDNN kernels for both; nothing may be timed on it."""
    monkeypatch.setattr(P, "cpu_native", lambda name: True)

    def no_probe(name):
        raise AssertionError(f"timed a {name} matmul on a CPU that computes it natively")

    monkeypatch.setattr(P, "cpu_slowdown", no_probe)


def settled(overrides, caplog):
    """(config, Precision, the precision module's log lines) of settling `overrides` for a CPU run."""
    cfg = compose_train(overrides)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="frod.precision"):
        precision = P.settle(cfg.model, torch.device("cpu"))
    return cfg, precision, [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "frod.precision"]


def test_emulated_dtype_warns_once_and_is_kept(emulated, caplog):
    cfg, precision, lines = settled(["debug=default", "model.dtype=bfloat16"], caplog)
    assert (cfg.model.dtype, precision.compute_dtype) == ("bfloat16", "bfloat16")  # what the user asked for
    [(level, message)] = lines
    assert level == "WARNING"
    for part in ("computing in bfloat16", "emulates bfloat16", "AVX2", "380x slower", "model.dtype=float32"):
        assert part in message, part
    assert precision.record() == {"compute_dtype": "bfloat16", "cpu_capability": "AVX2", "cpu_flags": list(P.cpu_flags()),
                                  "cpu_dtypes": {"bfloat16": "emulated", "float16": "emulated"}}
    cfg, precision, lines = settled(["debug=default", "model.dtype=auto"], caplog)
    assert (cfg.model.dtype, precision.compute_dtype) == ("float32", "float32")
    assert lines == [("INFO", "model.dtype=auto: float32 on cpu")]


def test_emulated_4bit_base_computes_in_float32_unless_named(emulated, caplog):
    from frod_cli.models import quantization_config
    from frod_cli.training import builders as B

    cfg, precision, lines = settled(["recipe=qfrod_smoke", "model.dtype=bfloat16"], caplog)
    assert (cfg.model.dtype, cfg.model.compute_dtype, precision.compute_dtype) == ("bfloat16", "float32", "float32")
    [(level, message)] = lines  # stated, not warned: nothing runs in the emulated dtype
    assert level == "INFO" and "computing in float32" in message and "model.compute_dtype=bfloat16" in message
    task = B.build_task(cfg.task, int(cfg.train.seed))
    assert quantization_config(cfg.model, task).bnb_4bit_compute_dtype == torch.float32
    model, _ = B.load_base(cfg.model, task, int(cfg.train.seed))
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.compute_dtype == torch.float32
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}  # embeddings, norms, head
    cfg, precision, lines = settled(["recipe=qfrod_smoke", "model.dtype=bfloat16", "model.compute_dtype=bfloat16"],
                                    caplog)
    assert precision.compute_dtype == "bfloat16"  # named: kept, with the warning
    [(level, message)] = lines
    assert level == "WARNING" and "model.compute_dtype=float32" in message


def test_native_changes_nothing(native, caplog):
    cfg, precision, lines = settled(["recipe=qfrod_smoke", "model.dtype=bfloat16"], caplog)
    assert (cfg.model.dtype, cfg.model.compute_dtype, precision.compute_dtype) == ("bfloat16",) * 3
    assert lines == []
    for dtype in ("bfloat16", "float16", "float32"):
        cfg, precision, lines = settled(["debug=default", f"model.dtype={dtype}"], caplog)
        assert (cfg.model.dtype, cfg.model.compute_dtype, precision.compute_dtype, lines) == (dtype, None, dtype, [])
    cfg, _, _ = settled(["debug=default", "model.dtype=auto"], caplog)
    assert cfg.model.dtype == "bfloat16"


def test_refusals(emulated):
    """Before anything loads (frod train settles right after its accelerator exists: one line, exit 2)."""
    for overrides, what in ((["model.compute_dtype=float32"], "applies to a 4-bit base"),
                            (["model.dtype=fp8"], "model.dtype must be one of float32, bfloat16, float16, auto"),
                            (["recipe=qfrod_smoke", "model.compute_dtype=auto"], "model.compute_dtype must be")):
        with pytest.raises(FrodCliError, match=what):
            P.settle(compose_train(["debug=default", *overrides]).model, torch.device("cpu"))


@pytest.mark.slow
def test_cpu_run_records_compute_dtype_and_capability(emulated, tmp_path):
    """End to end on the emulated answer: a 4-bit base with model.dtype=bfloat16 trains in float32, says so in its
    log and metrics.json (with the CPU's capability), keeps model.dtype in its config and writes merged/ in it."""
    from frod_cli.cli import run_verb

    run = tmp_path / "run"
    code, _ = run_verb("train", ["recipe=qfrod_smoke", "model.dtype=bfloat16", "train.max_steps=2", "train.eval_every=2",
                                 "task.max_train_samples=16", "task.max_eval_samples=8", "train.eval_test=false",
                                 "train.progress=false", f"hydra.run.dir={run}"])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["compute_dtype"], metrics["cpu_capability"]) == ("float32", "AVX2")
    assert metrics["cpu_dtypes"] == {"bfloat16": "emulated", "float16": "emulated"}
    assert "4-bit base: computing in float32" in (run / "train.log").read_text()
    from frod_cli.runs import load_run_config

    model = load_run_config(str(run)).model
    assert (model.dtype, model.compute_dtype) == ("bfloat16", "float32")
    assert json.loads((run / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA=AVX2 is an x86 setting")
def test_an_avx2_cpu_is_found_emulating_bfloat16():
    """Not the capability string: torch's oneDNN check, which follows what oneDNN may use (an AVX512 CPU capped at
    AVX2 answers as an AVX2 machine does, and bfloat16 then takes torch's scalar fallback)."""
    script = ("import json; from frod_cli import precision as P; "
              "print(json.dumps([P.cpu_record()['cpu_dtypes'], P.auto_dtype('cpu')]))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    dtypes, auto = json.loads(out.stdout.strip().splitlines()[-1])
    assert dtypes == {"bfloat16": "emulated", "float16": "emulated"} and auto == "float32"


def test_the_table_command(tmp_path, capsys):
    """`python -m frod_cli.precision`: the CPU's record, then one row per size with each dtype's rate (JSON too)."""
    out = tmp_path / "precision.json"
    assert P.main(["--sizes", "16,32", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| 16", "| 32"]
    saved = json.loads(out.read_text())
    assert set(saved["gflops"]) == {"16", "32"} and set(saved["gflops"]["16"]) == set(P.DTYPES)
    assert saved["cpu_dtypes"] == {name: "native" if P.cpu_native(name) else "emulated" for name in P.LOW}
