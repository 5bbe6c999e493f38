"""The RL rollout benchmark (frod_cli/bench/rollout.py) in-process on the smallest shapes: the JSON's keys and
what holds whatever the timing (no timing assertion)."""
from __future__ import annotations

import json

import pytest

from frod_cli.bench.cli import main

SMALL = ["--layers", "1", "--hidden", "72", "--intermediate", "96", "--threads", "1", "--quiet", "--r-groups", "2",
         "--r-group-size", "2", "--r-new-tokens", "3", "--r-prompt-len", "4", "--r-groups-per-call", "2"]


def test_rollout_throughput_and_memory(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--rollout", "throughput", "--r-bases", "float32", "--r-repeats", "1", "--out", str(out), *SMALL]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["base"] == "float32" and row["tokens"] == 2 * 2 * 3  # every completion runs to the limit
    assert row["build_s"] == row["build_s"]  # a number, not NaN (no sign assumed: a difference of two timings)
    assert row["frod_adapter_tokens_per_s"] > 0 and row["merged_tokens_per_s"] > 0 and row["adapter_vs_merged"] > 0
    out = tmp_path / "m.json"
    assert main(["--rollout", "memory", "--r-bases", "bfloat16", "--r-micro-batch", "2", "--r-steps", "1", "--out", str(out), *SMALL]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    frod, lora = rows["frod"], rows["lora"]
    assert frod["trainables"] < lora["trainables"]  # on these shapes LoRA r=64 trains more than FRoD
    assert frod["formula_rollout_held"] > 0 and lora["formula_rollout_held"] == 0
    for r in (frod, lora):
        assert r["formula_update_extra"] == r["adapter_bytes"] + 12 * r["trainables"]
        assert r["rollout_peak"] > 0 and r["update_peak"] > 0


def test_rollout_refusals(capsys):
    with pytest.raises(SystemExit) as e:
        main([*SMALL, "--rollout", "throughput", "--r-bases", "int8"])
    assert e.value.code == 2 and "unknown --r-bases name 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*SMALL, "--rollout", "memory", "--r-group-size", "0"])
    assert e.value.code == 2 and "--r-group-size must be at least 1, got 0" in capsys.readouterr().err
