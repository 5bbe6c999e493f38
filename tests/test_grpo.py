"""task.type=grpo end to end (one `frod train recipe=grpo_smoke` run, shared by the module: the mean reward rises,
every figure reaches metrics.jsonl, metrics.json and the tracker), long chat prompts fitted by the one
prompt-fitting rule, and the refusals, each one line before any training."""
from __future__ import annotations

import json

import datasets
import pytest

from conftest import compose_train, one_error_line, train_run

STEP_FIGURES = {"reward/mean", "reward/std", "reward/format/mean", "reward/math/std", "groups_all_equal",
                "completion_length/mean", "completion_length/max", "completion_length/cut", "clip_fraction",
                "clip_low", "clip_high", "ratio_mean", "ratio_min", "ratio_max"}
EVAL_FIGURES = {"reward_mean", "reward_std", "reward/format/mean", "reward/math/std", "accuracy/format",
                "accuracy/math", "completion_length/mean", "completion_length/max", "completion_length/cut"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run, _ = train_run(tmp_path_factory, "grpo", ["recipe=grpo_smoke", "train.progress=false",
                                                  "train.log_with=[tensorboard]"])
    return run


def test_the_smoke_reward_rises_and_every_figure_is_recorded(smoke):
    lines = [json.loads(line) for line in (smoke / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "split" not in r]
    rewards = [r["reward/mean"] for r in steps]
    quarter = len(rewards) // 4
    assert sum(rewards[-quarter:]) / quarter > sum(rewards[:quarter]) / quarter + 0.1, rewards
    assert STEP_FIGURES <= set(steps[-1]) and "kl" not in steps[-1]  # beta = 0: no reference pass
    assert steps[0]["ratio_min"] == steps[0]["ratio_max"] == 1.0  # one pass per rollout: rho = 1 exactly
    assert all(r["clip_fraction"] == 0.0 for r in steps)
    final = json.loads((smoke / "metrics.json").read_text())
    assert EVAL_FIGURES <= set(final["validation"]) and EVAL_FIGURES <= set(final["test"])
    counts = final["data_counts"]
    assert counts["rollouts"]["rollouts"] == len(steps) and counts["rollouts"]["prompts_not_sampled"] == 0
    assert counts["splits"]["train"]["too_long"] == 0
    records = [json.loads(line) for line in (smoke / "predictions.jsonl").read_text().splitlines()]
    assert records and {"prompt", "completion", "rewards", "reward", "tokens", "cut"} <= set(records[0])
    assert (smoke / "adapter").is_dir() and (smoke / "merged").is_dir()


def test_the_tracker_gets_the_step_and_evaluation_figures(smoke):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in sorted((smoke / "trackers").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in STEP_FIGURES} <= tags, tags
    assert {f"validation/{k}" for k in EVAL_FIGURES} <= tags, tags


def test_long_chat_prompts_drop_their_oldest_whole_turns(tmp_path, caplog):
    """Prompts longer than max_length - max_completion_length: the oldest whole turns go first (a system turn
    kept); a prompt whose last user turn alone leaves no room for the completion is dropped; both counted. The
    rewards get the prompt as fitted."""
    from frod_cli.config import apply_per_method
    from frod_cli.models import load_preprocessor
    from frod_cli.training import builders as B

    story = " ".join(["story"] * 30)
    long_turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": story},
                  {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What is 2 plus 3?"}]
    rows = ([{"messages": long_turns, "answer": "5"}] * 3 + [{"messages": long_turns[3:], "answer": "5"}] * 2
            + [{"messages": [{"role": "user", "content": story}], "answer": "1"}])
    overrides = ["recipe=grpo_smoke", "model=tiny_llama_chat", "task.max_length=40", "task.max_completion_length=8"]
    cfg = compose_train(overrides)
    apply_per_method(cfg, overrides)
    task = B.build_task(cfg.task, 0)
    tok = load_preprocessor(cfg.model, task)
    with caplog.at_level("WARNING", logger="frod_cli.tasks.grpo"):
        encoded = task.encode(datasets.DatasetDict(train=datasets.Dataset.from_list(rows)), tok)
    assert task.stats["train"] == {"prompts": 6, "kept": 5, "shortened": 3, "turns_dropped": 6, "too_long": 1}
    assert "3 shortened (6 oldest turns dropped), 1 dropped" in caplog.text
    kept = [long_turns[0], long_turns[3]]
    row = encoded["train"][0]
    want = tok(tok.apply_chat_template(kept, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert row["prompt_ids"] == want["input_ids"] and len(row["prompt_ids"]) <= 32
    batch = task.collate(tok)([encoded["train"][0], encoded["train"][4]])
    assert batch["reward_prompts"][0] == kept and batch["reward_prompts"][1] == long_turns[3:]
    assert batch["columns"]["answer"] == ["5", "5"] and "turns_dropped" not in batch["columns"]


@pytest.mark.parametrize("overrides, message", [
    (["task.group_size=1"], "task.group_size must be at least 2"),
    (["task.rewards=[{name: /nonexistent/r.py:f}]"], "the file /nonexistent/r.py does not exist"),
    (["task.rewards=[{name: {tmp}/r.py:missing}]"], "has no function 'missing' (callables there: ok)"),
    (["task.max_length=12"], "every prompt of split 'train' is longer than"),
    (["method=full", "task.beta=0.1"], "method=full trains every weight"),
    (["task.num_iterations=0"], "task.num_iterations must be at least 1"),
    (["task.prompt_field=question"], "split 'train' has neither a 'question' (task.prompt_field) nor a 'messages'"),
    (["task.rewards=[{name: math, answer_field: solution}]"], "reward math: split 'train' has no column 'solution'"),
])
def test_refusals(tmp_path, capsys, overrides, message):
    from frod_cli.cli import run_verb

    (tmp_path / "r.py").write_text("def ok(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    code, _ = run_verb("train", ["recipe=grpo_smoke", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before the run was accepted: nothing written
