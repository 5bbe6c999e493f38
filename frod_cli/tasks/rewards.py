"""Rewards for online RL (task.type=grpo): functions that score completions, several of them with weights.

A reward function has TRL's signature, so the functions users already wrote for TRL's GRPOTrainer work here:
    fn(prompts, completions, **columns) -> list of float | None, one per completion
`prompts` and `completions` are strings, or, for chat data, lists of {role, content} messages (a completion is
then [{"role": "assistant", "content": text}]); `columns` holds the data set's other columns (one value per
completion, e.g. `answer`) and `completion_ids` (the completion's token ids). None means "not applicable" (a math
reward on a code prompt): that reward is left out of its own mean and contributes 0 to the weighted total, as
TRL does (its nansum); a completion every reward calls not applicable gets a total of 0, with a warning.

Built-ins (no network), by name (`REWARDS`):
  exact_match  1.0 when the completion's answer equals the reference column's (`answer_field`), both read by
               `answer_pattern` and normalized as exact match does everywhere (frod_cli/tasks/answers.py),
               else 0.0; None when the reference is empty
  math         1.0 when math-verify (0.9.0) finds the completion's answer equivalent to the reference
               (LaTeX, fractions, decimals: 3/4 = 0.75), else 0.0; None when it cannot read the reference.
               Fallback, when math-verify is not installed or fails on a row (its parser raised or timed out):
               the last number of each side in canonical form ("1,000.0" = "1000"), exact for the integer and
               decimal answers of word problems; logged once
  format       1.0 when the regular expression `pattern` matches somewhere in the completion (Python `re`,
               DOTALL; anchor it with ^ and \\Z to demand the whole text), else 0.0
  length       DAPO's soft overlong penalty on the completion's token count L, with the limit L_max = `limit`
               and the buffer L_c = `buffer`: 0 when L <= L_max - L_c, (L_max - L_c - L) / L_c up to L_max, -1
               beyond (so -1 for a completion cut at the limit; only shorter answers escape it)
User functions: `path/to/file.py:function`, imported from that file (never from the Hub, never by module name),
refused in one line when the file does not exist, cannot be imported, or has no such callable.

A reward that raises, returns the wrong number of values, or a value that is not a finite number or None stops
the run with one line naming the function and the first prompt it failed on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import MISSING

from frod_cli import FrodCliError, one_line

from .answers import answer_rule, canonical_number, compile_regex, extract_answer, normalize_answer

log = logging.getLogger(__name__)
RewardFn = Callable[..., Sequence[Optional[float]]]


@dataclass
class RewardConfig:
    """One reward of task.rewards: a built-in's name or `path/to/file.py:function`, its weight, its settings."""

    name: str = MISSING  # exact_match | math | format | length | <file.py>:<function>
    weight: float = 1.0
    answer_field: str = "answer"  # exact_match, math: the column holding the reference answer
    answer_pattern: str = "last_number"  # exact_match: full | last_number | first_word | regex:<pattern>
    pattern: Optional[str] = None  # format: the regular expression
    limit: Optional[int] = None  # length: L_max in tokens (None: the task's completion length limit)
    buffer: Optional[int] = None  # length: L_c in tokens (None: a quarter of the limit)


def completion_text(completion: Any) -> str:
    """The text of a completion: itself, or the content of a message list's last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def _reference(columns: Dict[str, Any], field: str, name: str) -> List[Any]:
    if field not in columns:
        raise FrodCliError(f"reward {name}: the data has no column {field!r} (answer_field); columns: "
                           f"{', '.join(sorted(k for k in columns if k != 'completion_ids')) or 'none'}")
    return list(columns[field])


# -------------------------------------------------------------------------------------------------- built-ins
def exact_match_reward(answer_field: str = "answer", answer_pattern: str = "last_number") -> RewardFn:
    rule = answer_rule(answer_pattern)  # refuses an unknown rule now, not at the first step

    def exact_match(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> List[Optional[float]]:
        out: List[Optional[float]] = []
        for completion, ref in zip(completions, _reference(columns, answer_field, "exact_match")):
            gold = normalize_answer(rule(str(ref)) if ref is not None else None)
            if not gold:
                out.append(None)
                continue
            out.append(float(normalize_answer(rule(completion_text(completion))) == gold))
        return out

    return exact_match


class _MathVerify:
    """math-verify's parse/verify with the last-number fallback (module docstring); warns once per reason."""

    def __init__(self) -> None:
        self.warned: set = set()
        try:
            import math_verify

            self.mv: Any = math_verify
        except ImportError:
            self.mv = None
            self.warn("math-verify is not installed (pip install math-verify==0.9.0)")

    def warn(self, why: str) -> None:
        if why not in self.warned:
            self.warned.add(why)
            log.warning("reward math: %s; comparing the last numbers instead", why)

    def __call__(self, gold: str, text: str) -> Optional[float]:
        if self.mv is not None:
            # its timeouts use signal.alarm, which works in the main thread only
            main = threading.current_thread() is threading.main_thread()
            limit = 5 if main else None
            try:
                parsed_gold = self.mv.parse(gold, parsing_timeout=limit, raise_on_error=True)
                if not parsed_gold:
                    return None
                return float(self.mv.verify(parsed_gold, self.mv.parse(text, parsing_timeout=limit,
                                                                        raise_on_error=True),
                                            timeout_seconds=limit, raise_on_error=True))
            except Exception as e:  # noqa: BLE001 - a parser failure on one row is the fallback's case
                self.warn(f"math-verify failed ({type(e).__name__}: {one_line(e, 120)})")
        gold_number = extract_answer(gold, "last_number")
        if gold_number is None:
            return None
        return float(extract_answer(text, "last_number") == canonical_number(gold_number))


def math_reward(answer_field: str = "answer") -> RewardFn:
    checker = _MathVerify()

    def math(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> List[Optional[float]]:
        refs = _reference(columns, answer_field, "math")
        return [None if ref is None or not str(ref).strip() else checker(str(ref), completion_text(c))
                for c, ref in zip(completions, refs)]

    return math


def format_reward(pattern: Optional[str]) -> RewardFn:
    if not pattern:
        raise FrodCliError("reward format needs a pattern (a regular expression), e.g. pattern='^\\s*\\d'")
    rx = compile_regex(pattern, f"reward format: {pattern!r}")

    def format(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> List[Optional[float]]:
        return [float(rx.search(completion_text(c)) is not None) for c in completions]

    return format


def length_reward(limit: int, buffer: Optional[int] = None) -> RewardFn:
    limit = int(limit)
    buffer = max(1, limit // 4) if buffer is None else int(buffer)
    if limit < 1 or not 1 <= buffer <= limit:
        raise FrodCliError(f"reward length needs limit >= 1 and 1 <= buffer <= limit, got limit={limit}, "
                           f"buffer={buffer}")
    free = limit - buffer

    def length(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> List[Optional[float]]:
        ids = columns.get("completion_ids")
        if ids is None:
            raise FrodCliError("reward length counts tokens and was given no completion_ids")
        return [0.0 if len(t) <= free else (-1.0 if len(t) > limit else (free - len(t)) / buffer) for t in ids]

    return length


BUILTINS = ("exact_match", "math", "format", "length")


# ------------------------------------------------------------------------------------------ user functions
def load_user_function(spec: str) -> RewardFn:
    """`path/to/file.py:function` -> the callable, imported from that file under a private module name."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise FrodCliError(f"reward {spec!r}: name a built-in ({', '.join(BUILTINS)}) or a function in a "
                           f"Python file as path/to/file.py:function")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FrodCliError(f"reward {spec!r}: the file {path} does not exist")
    module_name = "frod_user_rewards_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("not a Python source file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look their module up here
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: any failure to import it is bad input
        sys.modules.pop(module_name, None)
        raise FrodCliError(f"reward {spec!r}: importing {path} failed: {type(e).__name__}: {one_line(e)}") from None
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise FrodCliError(f"reward {spec!r}: {path} has no function {name!r} (callables there: "
                           f"{', '.join(public) or 'none'})")
    if not callable(fn):
        raise FrodCliError(f"reward {spec!r}: {name!r} in {path} is a {type(fn).__name__}, not a function")
    return fn


def reference_columns(configs: Sequence[Any]) -> List[Tuple[str, str]]:
    """(reward name, the data column it reads) for each built-in that reads a reference answer, so that a data set
    without that column is refused when it is loaded, not at the first step."""
    return [(str(c.name), str(c.answer_field)) for c in configs if str(c.name) in ("exact_match", "math")]


def build_reward(cfg: Any, completion_limit: Optional[int] = None) -> RewardFn:
    """The function of one RewardConfig (a built-in with its settings, or the user's)."""
    name = str(cfg.name)
    if name == "exact_match":
        return exact_match_reward(cfg.answer_field, cfg.answer_pattern)
    if name == "math":
        return math_reward(cfg.answer_field)
    if name == "format":
        return format_reward(cfg.pattern)
    if name == "length":
        limit = cfg.limit if cfg.limit is not None else completion_limit
        if limit is None:
            raise FrodCliError("reward length needs limit (tokens) when the task sets no completion length limit")
        return length_reward(limit, cfg.buffer)
    if ":" not in name:
        raise FrodCliError(f"unknown reward {name!r}; built-ins: {', '.join(BUILTINS)}; or path/to/file.py:function")
    return load_user_function(name)


# ------------------------------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """The rewards of N completions: `per_reward` [N, K] (NaN where a reward said None), `total` [N] (the
    weighted sum over the applicable rewards), and the rewards' names in column order."""

    names: List[str]
    per_reward: torch.Tensor
    total: torch.Tensor

    def summary(self, group_size: int) -> Dict[str, float]:
        """Metrics of the batch: mean and std of each reward (over the completions it applies to; a user function
        is named by its function name) and of the total, and `groups_all_equal`, the share of groups whose G totals
        are all equal (their advantages are 0: no signal)."""
        out: Dict[str, float] = {}
        for k, name in enumerate(self.names):
            column = self.per_reward[:, k]
            column = column[~torch.isnan(column)]
            key = "reward/" + name.rsplit(":", 1)[-1]
            key = key if key + "/mean" not in out else f"{key}_{k}"
            out[key + "/mean"] = float(column.mean()) if len(column) else float("nan")
            out[key + "/std"] = float(column.std(unbiased=False)) if len(column) else float("nan")
        total = self.total.reshape(-1, int(group_size))
        out["reward/mean"] = float(total.mean())
        out["reward/std"] = float(total.std(unbiased=False))
        out["groups_all_equal"] = float((total.max(dim=1).values == total.min(dim=1).values).float().mean())
        return out


def _short(prompt: Any, limit: int = 80) -> str:
    text = " ".join(completion_text(prompt).split()) if not isinstance(prompt, str) else " ".join(prompt.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


class RewardSet:
    """Several rewards with weights: `score` runs each on a batch of completions and checks what it returns."""

    def __init__(self, functions: Sequence[RewardFn], weights: Sequence[float], names: Sequence[str]):
        if not functions:
            raise FrodCliError("task.rewards is empty: name at least one reward")
        if not len(functions) == len(weights) == len(names):
            raise ValueError("one weight and one name per reward function")
        self.functions, self.names = list(functions), list(names)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.warned_inapplicable = False

    @classmethod
    def from_configs(cls, configs: Sequence[Any], completion_limit: Optional[int] = None) -> "RewardSet":
        return cls([build_reward(c, completion_limit) for c in configs], [float(c.weight) for c in configs],
                   [str(c.name) for c in configs])

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], columns: Dict[str, Sequence[Any]]) -> Scores:
        """Score N completions; `prompts` and every column hold one value per completion."""
        n = len(completions)
        table = torch.full((n, len(self.functions)), float("nan"), dtype=torch.float32)
        for k, (fn, name) in enumerate(zip(self.functions, self.names)):
            table[:, k] = self._run(fn, name, prompts, completions, columns)
        total = torch.nansum(table * self.weights, dim=1)
        idle = torch.isnan(table).all(dim=1)
        if bool(idle.any()) and not self.warned_inapplicable:
            self.warned_inapplicable = True
            first = int(idle.nonzero()[0, 0])
            log.warning("every reward returned None (not applicable) for %d of %d completions (first prompt %s): "
                        "their total reward is 0", int(idle.sum()), n, _short(prompts[first]))
        return Scores(self.names, table, total)

    def _run(self, fn: RewardFn, name: str, prompts: Sequence[Any], completions: Sequence[Any],
             columns: Dict[str, Sequence[Any]]) -> torch.Tensor:
        try:
            values = fn(prompts=list(prompts), completions=list(completions), **columns)
        except FrodCliError:
            raise
        except Exception as e:  # noqa: BLE001 - the reward's own failure: find the prompt it fails on
            raise FrodCliError(self._failure(fn, name, prompts, completions, columns, e)) from None
        try:
            values = list(values)
        except TypeError:
            raise FrodCliError(f"reward {name} returned a {type(values).__name__}, not a list of numbers (first "
                               f"prompt {_short(prompts[0])})") from None
        if len(values) != len(completions):
            raise FrodCliError(f"reward {name} returned {len(values)} values for {len(completions)} completions "
                               f"(first prompt {_short(prompts[0])})")
        out = torch.full((len(values),), float("nan"), dtype=torch.float32)
        for i, v in enumerate(values):
            if v is None:
                continue
            number = _number(v)
            if number is None:
                raise FrodCliError(f"reward {name} returned {v!r} (not a finite number or None) for prompt "
                                   f"{_short(prompts[i])}")
            out[i] = number
        return out

    def _failure(self, fn: RewardFn, name: str, prompts: Sequence[Any], completions: Sequence[Any],
                 columns: Dict[str, Sequence[Any]], error: Exception) -> str:
        """The refusal for a reward that raised: the first prompt it raises on when called alone."""
        for i in range(len(completions)):
            try:
                fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
            except Exception as e:  # noqa: BLE001
                return f"reward {name} raised {type(e).__name__}: {one_line(e, 200)} (prompt {_short(prompts[i])})"
        return (f"reward {name} raised {type(error).__name__}: {one_line(error, 200)} on a batch of "
                f"{len(completions)} completions (first prompt {_short(prompts[0])})")


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and not isinstance(value, (str, bytes)) else None
