"""Write the small preference sets shipped for the preference task (DPO/IPO/SimPO) smoke recipe and tests.

    python scripts/make_pref_tiny.py           # rewrites frod_cli/tasks/data/pref_tiny{,_chat}.jsonl

Both are built from the packaged instruction set frod_cli/tasks/data/sft_tiny.jsonl (scripts/make_sft_tiny.py):
every row keeps its question as the prompt and its right answer as `chosen`; `rejected` is a wrong answer of
the same kind, made by a rule per kind of question:
  arithmetic (plus, minus, times, "gets N more")  the right number moved by a small offset drawn from
                                                  {-10, -2, -1, +1, +2, +10} (kept non-negative)
  "which number is larger"                        the smaller of the two numbers
  sentiment, even/odd                             the other label
  capital of a country                            another country's capital (one of the set's own answers)
  opposite of a word                              the word itself
  letters in a word                               the count off by one
So the chosen answer is always the correct one and the rejected one is always wrong but plausible (same
form, same length or close to it).

pref_tiny.jsonl       320 rows {prompt, chosen, rejected}, all strings (TRL's standard preference layout, read
                      as it is, never through a chat template). The prompt is written in causal_lm's plain
                      instruction layout ("### Instruction:\n...\n\n[### Input:\n...\n\n]### Response:\n"), so
                      a model fine-tuned with recipe=sft_smoke sees the prompts it was trained on.
pref_tiny_chat.jsonl  the same 320 pairs as {chosen, rejected}, each a list of {role, content} turns that share
                      their prompt turns and differ in the last assistant turn (TRL's conversational layout with
                      an implicit prompt; rendered with the tokenizer's chat template). The user turn is the
                      instruction, then a blank line and the input if any; every 4th pair has an earlier
                      user/assistant exchange (another row's question with its right answer) before the question.
Deterministic: a fixed seed and no clock, so rerunning the script reproduces the files byte for byte.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from make_sft_tiny import user_text, write_jsonl  # scripts/ is on sys.path when a script runs

DATA = Path(__file__).resolve().parent.parent / "frod_cli" / "tasks" / "data"
SEED = 20260118
OFFSETS = (-10, -2, -1, 1, 2, 10)


def kind(instruction: str) -> str:
    for key, pattern in (("larger", "larger"), ("sentiment", "sentiment"), ("parity", "even or odd"),
                         ("capital", "capital of"), ("opposite", "opposite"), ("letters", "letters are in")):
        if pattern in instruction:
            return key
    if re.search(r" (plus|minus|times) | gets \d+ more", instruction):
        return "arithmetic"
    raise ValueError(f"no rejection rule for {instruction!r}")


def rejected(row: dict, rng: random.Random, capitals: list) -> str:
    k, right = kind(row["instruction"]), row["output"]
    if k == "arithmetic":
        n = int(right)
        wrong = [n + d for d in OFFSETS if n + d >= 0]
        return str(rng.choice(wrong))
    if k == "larger":
        a, b = (int(x) for x in row["input"].split(" or "))
        return str(min(a, b))
    if k == "sentiment":
        return "negative" if right == "positive" else "positive"
    if k == "parity":
        return "odd" if right == "even" else "even"
    if k == "capital":
        return rng.choice([c for c in capitals if c != right])
    if k == "opposite":
        return row["input"]
    return str(int(right) + rng.choice((-1, 1)))  # letters


def plain_prompt(row: dict) -> str:
    """causal_lm's plain instruction layout (frod_cli.tasks.layouts.instruction_prompt), written out."""
    parts = [f"### Instruction:\n{row['instruction']}"]
    if row["input"]:
        parts.append(f"### Input:\n{row['input']}")
    return "\n\n".join(parts + ["### Response:\n"])


def main() -> None:
    with open(DATA / "sft_tiny.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    capitals = sorted({r["output"] for r in rows if kind(r["instruction"]) == "capital"})
    rng = random.Random(SEED)
    answers = [(r["output"], rejected(r, rng, capitals)) for r in rows]
    assert all(good != bad for good, bad in answers)
    pairs = [{"prompt": plain_prompt(r), "chosen": good, "rejected": bad} for r, (good, bad) in zip(rows, answers)]
    chats = []
    for k, (r, (good, bad)) in enumerate(zip(rows, answers)):
        turns = []
        if k % 4 == 3:  # an earlier exchange, the same in both conversations
            q = rows[len(rows) - 1 - k]
            turns = [{"role": "user", "content": user_text(q)}, {"role": "assistant", "content": q["output"]}]
        turns.append({"role": "user", "content": user_text(r)})
        chats.append({"chosen": turns + [{"role": "assistant", "content": good}],
                      "rejected": turns + [{"role": "assistant", "content": bad}]})
    write_jsonl("pref_tiny.jsonl", pairs)
    write_jsonl("pref_tiny_chat.jsonl", chats)


if __name__ == "__main__":
    main()
