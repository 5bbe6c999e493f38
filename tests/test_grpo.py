"""task.type=grpo end to end (one `frod train recipe=grpo_smoke` run, shared by the module) and its refusals, each
one line before any training."""
from __future__ import annotations

import json

import pytest

from conftest import one_error_line, train_run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run, _ = train_run(tmp_path_factory, "grpo", ["recipe=grpo_smoke"])
    return run


def test_the_smoke_reward_rises_and_the_run_is_complete(smoke):
    lines = [json.loads(line) for line in (smoke / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "split" not in r]
    rewards = [r["reward/mean"] for r in steps]
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    for key in ("reward/format/mean", "reward/math/std", "groups_all_equal", "completion_length/mean",
                "completion_length/cut", "clip_fraction", "ratio_max"):
        assert key in steps[-1]
    assert steps[0]["ratio_min"] == steps[0]["ratio_max"] == 1.0  # one pass per rollout: rho = 1 exactly
    final = json.loads((smoke / "metrics.json").read_text())
    assert {"reward_mean", "accuracy/format", "accuracy/math"} <= set(final["validation"])
    records = [json.loads(line) for line in (smoke / "predictions.jsonl").read_text().splitlines()]
    assert records and {"prompt", "completion", "rewards", "reward"} <= set(records[0])
    assert (smoke / "adapter").is_dir() and (smoke / "merged").is_dir()


@pytest.mark.parametrize("overrides, message", [
    (["task.group_size=1"], "task.group_size must be at least 2"),
    (["task.rewards=[{name: /nonexistent/r.py:f}]"], "the file /nonexistent/r.py does not exist"),
    (["task.max_length=12"], "every prompt of split 'train' is longer than"),
    (["method=full", "task.beta=0.1"], "method=full trains every weight"),
])
def test_refusals(tmp_path, capsys, overrides, message):
    from frod_cli.cli import run_verb

    code, _ = run_verb("train", ["recipe=grpo_smoke", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2
    assert message in one_error_line(capsys)
