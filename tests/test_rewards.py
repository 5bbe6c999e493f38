"""Rewards (frod_cli/tasks/rewards.py): the built-ins, user functions from a file with TRL's signature, None as
"not applicable", weights, the batch metrics, and every refusal as one line naming the function and the prompt."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.tasks import rewards as RW


def cfg(**values):
    return OmegaConf.structured(RW.RewardConfig(**values))


def run(fn, completions, prompts=None, **columns):
    return list(fn(prompts=prompts or ["q"] * len(completions), completions=completions, **columns))


def test_exact_match_reads_the_answer_as_exact_match_does():
    fn = RW.build_reward(cfg(name="exact_match"))
    got = run(fn, ["so it is 1,000.0", "12", "no number", "7"], answer=["1000", "13", "5", ""])
    assert got == [1.0, 0.0, 0.0, None]  # an empty reference: not applicable
    fn = RW.build_reward(cfg(name="exact_match", answer_pattern="first_word", answer_field="label"))
    assert run(fn, ["Positive!", [{"role": "assistant", "content": "negative"}]], label=["positive", "positive"]) == [1.0, 0.0]


def test_math_verify_and_its_fallback(monkeypatch, caplog):
    fn = RW.build_reward(cfg(name="math"))
    got = run(fn, ["The answer is 0.75.", "3/4", "It is 12 then 13", "x"], answer=["3/4", "0.75", "12", "text only"])
    assert got == [1.0, 1.0, 0.0, None]  # equivalent forms; the last number counts; an unreadable reference: None
    monkeypatch.setitem(sys.modules, "math_verify", None)  # not installed: the last-number rule
    with caplog.at_level(logging.WARNING, logger="frod_cli.tasks.rewards"):
        fallback = RW.build_reward(cfg(name="math"))
    assert "not installed" in caplog.text
    assert run(fallback, ["so 1,000.0", "12", "nothing"], answer=["1000", "13", "4"]) == [1.0, 0.0, 0.0]


def test_format_and_length():
    fn = RW.build_reward(cfg(name="format", pattern=r"^\s*\d"))
    assert run(fn, [" 42 apples", "apples 42"]) == [1.0, 0.0]
    fn = RW.build_reward(cfg(name="length", buffer=4), completion_limit=10)
    ids = [[0] * 6, [0] * 8, [0] * 10, [0] * 11]
    assert run(fn, ["a"] * 4, completion_ids=ids) == [0.0, -0.5, -1.0, -1.0]  # (L_max - L_c - L) / L_c


def write(tmp_path, source):
    path = tmp_path / "my_rewards.py"
    path.write_text(source)
    return path


def test_user_function_with_trl_signature_none_and_weights(tmp_path, caplog):
    path = write(tmp_path, "def short(prompts, completions, answer, **kw):\n"
                           "    return [None if a == 'skip' else float(len(c) < 3) for c, a in zip(completions, answer)]\n"
                           "def seen(prompts, completions, completion_ids, **kw):\n"
                           "    return [None if p == 'q2' else float(len(i)) for p, i in zip(prompts, completion_ids)]\n")
    rs = RW.RewardSet.from_configs([cfg(name=f"{path}:short", weight=2.0), cfg(name=f"{path}:seen", weight=0.5)])
    with caplog.at_level(logging.WARNING, logger="frod_cli.tasks.rewards"):
        scores = rs.score(["q1", "q1", "q2", "q2"], ["ab", "abcd", "x", "xyz"],
                          {"answer": ["1", "1", "skip", "1"], "completion_ids": [[1], [1, 2], [3], [4, 5, 6]]})
    assert torch.isnan(scores.per_reward[2]).all()  # every reward said None: total 0, with a warning
    assert scores.total.tolist() == [2.0 + 0.5, 0.0 + 1.0, 0.0, 0.0]
    assert "every reward returned None" in caplog.text and "'q2'" in caplog.text
    m = scores.summary(group_size=2)
    assert m["reward/short/mean"] == pytest.approx(1 / 3)  # the None is left out of its own mean
    assert m["reward/seen/mean"] == pytest.approx(1.5)
    assert m["reward/mean"] == pytest.approx(3.5 / 4)
    assert m["groups_all_equal"] == 0.5  # the second group's totals are 0 and 0


@pytest.mark.parametrize("body, message", [
    ("def f(prompts, completions, **kw):\n    return [1 / (len(c) - 3) for c in completions]\n",
     "reward f raised ZeroDivisionError: division by zero (prompt 'bad one')"),
    ("def f(prompts, completions, **kw):\n    return [1.0]\n", "reward f returned 1 values for 2 completions (first prompt 'good')"),
    ("def f(prompts, completions, **kw):\n    return [1.0, 'x']\n", "reward f returned 'x' (not a finite number or None) for prompt 'bad one'"),
    ("def f(prompts, completions, **kw):\n    return [1.0, float('nan')]\n", "returned nan (not a finite number or None) for prompt 'bad one'"),
    ("def f(prompts, completions, **kw):\n    return 3.0\n", "reward f returned a float, not a list of numbers"),
])
def test_a_failing_reward_is_one_line_naming_it_and_the_prompt(tmp_path, body, message):
    path = write(tmp_path, body)
    rs = RW.RewardSet([RW.load_user_function(f"{path}:f")], [1.0], ["f"])
    with pytest.raises(FrodCliError) as e:
        rs.score(["good", "bad one"], ["abcd", "abc"], {})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_refusals(tmp_path):
    path = write(tmp_path, "import os\nvalue = 3\ndef ok(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    cases = {f"{tmp_path}/nope.py:f": "does not exist", f"{path}:missing": "has no function 'missing' (callables there: ok)",
             f"{path}:value": "is a int, not a function", "bleu": "unknown reward 'bleu'", f"{path}:": "path/to/file.py:function"}
    for name, message in cases.items():
        with pytest.raises(FrodCliError, match="^reward|^unknown") as e:
            RW.build_reward(cfg(name=name))
        assert message in str(e.value), (name, str(e.value))
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(FrodCliError, match="importing .*broken.py failed: SyntaxError"):
        RW.load_user_function(f"{broken}:f")
    with pytest.raises(FrodCliError, match="needs a pattern"):
        RW.build_reward(cfg(name="format"))
    with pytest.raises(FrodCliError, match="not a valid regular expression"):
        RW.build_reward(cfg(name="format", pattern="("))
    with pytest.raises(FrodCliError, match="needs limit"):
        RW.build_reward(cfg(name="length"))
    with pytest.raises(FrodCliError, match="no column 'answer'"):
        RW.RewardSet.from_configs([cfg(name="math")]).score(["q"], ["1"], {"label": ["1"]})
    with pytest.raises(FrodCliError, match="task.rewards is empty"):
        RW.RewardSet([], [], [])
