"""Write the small instruction datasets shipped for the causal_lm smoke recipe and tests.

    python scripts/make_sft_tiny.py            # rewrites frod_cli/tasks/data/sft_tiny{,_chat}.jsonl

sft_tiny.jsonl       320 instruction/input/output rows: arithmetic and word problems with numeric answers,
                     "answer with one word" questions (sentiment, parity, capitals, opposites), letter
                     counting. Outputs are the bare answer, so `answer_pattern=full` (or last_number on
                     the numeric ones) scores them.
sft_tiny_chat.jsonl  64 `messages` conversations (user/assistant turns; every 4th has two exchanges) built
                     from the same generator, for the chat format.
Deterministic: a fixed seed and no clock, so rerunning the script reproduces the files byte for byte.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "frod_cli" / "tasks" / "data"
N_ROWS, N_CHAT, SEED = 320, 64, 20260101

CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Russia", "Moscow"), ("Austria", "Vienna"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"),
]
OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
    ("early", "late"), ("light", "dark"), ("full", "empty"), ("hard", "soft"), ("old", "new"), ("wet", "dry"),
    ("left", "right"), ("high", "low"), ("strong", "weak"), ("rich", "poor"),
]
POSITIVE = ["I loved this movie", "The food was delicious", "What a wonderful day", "The staff were friendly and helpful",
            "This book is a joy to read", "Great value for the price", "The concert was amazing",
            "I would happily buy it again"]
NEGATIVE = ["I hated this movie", "The food was cold and bland", "What a terrible day", "The staff were rude",
            "This book is boring", "It broke after one use", "The concert was a disappointment",
            "I want my money back"]
WORDS = ["apple", "river", "garden", "pencil", "window", "planet", "candle", "rabbit", "forest", "guitar",
         "bridge", "orange", "silver", "winter", "marble", "ladder"]
NAMES = ["Tom", "Anna", "Ravi", "Mei", "Omar", "Lena", "Sam", "Ines"]
THINGS = ["apples", "books", "stamps", "marbles", "coins", "shells"]


def one(rng: random.Random) -> dict:
    kind = rng.randrange(10)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 0:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return {"instruction": f"What is {a} minus {b}?", "input": "", "output": str(a - b)}
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"instruction": f"What is {a} times {b}?", "input": "", "output": str(a * b)}
    if kind == 3:
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        return {"instruction": f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
                "input": "", "output": str(a + b)}
    if kind == 4:
        if a == b:
            b += 1
        return {"instruction": "Which number is larger? Answer with the number.", "input": f"{a} or {b}",
                "output": str(max(a, b))}
    if kind == 5:
        positive = rng.random() < 0.5
        text = rng.choice(POSITIVE if positive else NEGATIVE)
        return {"instruction": "Classify the sentiment of the review. Answer with one word: positive or negative.",
                "input": text, "output": "positive" if positive else "negative"}
    if kind == 6:
        n = rng.randint(1, 999)
        return {"instruction": f"Is {n} even or odd? Answer with one word.", "input": "",
                "output": "even" if n % 2 == 0 else "odd"}
    if kind == 7:
        country, city = rng.choice(CAPITALS)
        return {"instruction": f"What is the capital of {country}? Answer with one word.", "input": "", "output": city}
    if kind == 8:
        w, o = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            w, o = o, w
        return {"instruction": "Give the opposite of the word. Answer with one word.", "input": w, "output": o}
    w = rng.choice(WORDS)
    return {"instruction": f"How many letters are in the word \"{w}\"?", "input": "", "output": str(len(w))}


def rows(n: int, rng: random.Random) -> list:
    out, seen = [], set()
    while len(out) < n:
        r = one(rng)
        key = (r["instruction"], r["input"])
        if key not in seen:  # no duplicate prompts: they would leak between the carved-out splits
            seen.add(key)
            out.append(r)
    return out


def write_jsonl(name: str, items: list) -> None:
    """One packaged set under frod_cli/tasks/data/ (the other make_*.py scripts write theirs with it too)."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / name, "w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {OUT / name} ({len(items)} rows)")


def user_text(r: dict) -> str:
    return r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")


def main() -> None:
    rng = random.Random(SEED)
    data = rows(N_ROWS, rng)
    chat_rows = rows(N_CHAT + N_CHAT // 4, random.Random(SEED + 1))
    chats, i = [], 0
    for k in range(N_CHAT):
        msgs = []
        for _ in range(2 if k % 4 == 3 else 1):
            r = chat_rows[i]
            i += 1
            msgs += [{"role": "user", "content": user_text(r)}, {"role": "assistant", "content": r["output"]}]
        chats.append({"messages": msgs})
    write_jsonl("sft_tiny.jsonl", data)
    write_jsonl("sft_tiny_chat.jsonl", chats)


if __name__ == "__main__":
    main()
