"""Reading an answer off a generated text, and the normalisation exact match compares with.

`task.answer_pattern` (the same rule is applied to the generation and to the reference):
  full             the whole text, stripped
  last_number      the last number in the text; commas in numbers removed; GSM8K's "#### 42" (the number
                   after the last "####") wins when present; "42.0" -> "42", "3.50" -> "3.5", "+7" -> "7"
  first_word       the first word, lowercased, surrounding punctuation stripped ("**Positive**," -> "positive")
  regex:<pattern>  the first match of <pattern> (Python `re`, DOTALL): its first group when it has one,
                   else the whole match
A rule that finds nothing gives None (scored as wrong).

`normalize_answer` (both sides, before exact match): None -> "", lowercased, whitespace collapsed,
surrounding quotes/brackets/punctuation stripped, a number written canonically (commas dropped, no
trailing zeros: "1,000.0" -> "1000").
"""
from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional

from frod_cli import FrodCliError

RULES = ("full", "last_number", "first_word", "regex:<pattern>")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_EDGE = string.punctuation.replace("-", "").replace("+", "") + "“”‘’«»"  # keep a sign on "-3"


def canonical_number(text: str) -> str:
    """'1,000.50' -> '1000.5', '42.0' -> '42', '+7' -> '7', '-0' -> '0'; other text unchanged."""
    raw = text.replace(",", "").strip()
    try:
        d = Decimal(raw)
    except InvalidOperation:
        return text
    if not d.is_finite():
        return text
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _last_number(text: str) -> Optional[str]:
    if "####" in text:  # GSM8K: the final answer follows "####"
        tail = _NUMBER.search(text.rsplit("####", 1)[1])
        if tail:
            return canonical_number(tail.group(0))
    found = _NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


def _first_word(text: str) -> Optional[str]:
    for word in text.split():
        word = word.strip(string.punctuation + "“”‘’«»").lower()
        if word:
            return word
    return None


def compile_regex(source: str, named: str) -> "re.Pattern":
    """A user's regular expression (DOTALL), or one line naming where it came from and why it does not compile."""
    try:
        return re.compile(source, re.DOTALL)
    except re.error as e:
        raise FrodCliError(f"{named} is not a valid regular expression: {e}") from None



def answer_rule(pattern: str) -> Callable[[str], Optional[str]]:
    """The extraction function for `task.answer_pattern`; refuses an unknown rule or a bad regex."""
    if pattern == "full":
        return lambda text: text.strip()
    if pattern == "last_number":
        return _last_number
    if pattern == "first_word":
        return _first_word
    if pattern.startswith("regex:"):
        source = pattern[len("regex:"):]
        if not source:
            raise FrodCliError("task.answer_pattern=regex: needs a pattern after 'regex:'")
        rx = compile_regex(source, f"task.answer_pattern {pattern!r}")

        def by_regex(text: str) -> Optional[str]:
            m = rx.search(text)
            if m is None:
                return None
            group = next((g for g in m.groups() if g is not None), None) if rx.groups else m.group(0)
            return None if group is None else group.strip()

        return by_regex
    raise FrodCliError(f"unknown task.answer_pattern {pattern!r}; use {', '.join(RULES)}")


def extract_answer(text: Optional[str], pattern: str = "full") -> Optional[str]:
    """The answer in `text` by rule `pattern` (see the module docstring); None when the rule finds none."""
    if text is None:
        return None
    return answer_rule(pattern)(str(text))


def normalize_answer(text: Optional[str]) -> str:
    """The form both sides of exact match are compared in."""
    if text is None:
        return ""
    s = " ".join(str(text).lower().split())
    s = s.strip(_EDGE + " ")
    if s and _NUMBER.fullmatch(s):
        s = canonical_number(s)
    return s
