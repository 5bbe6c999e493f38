"""Arithmetic word problems with their answers, for online RL with verifiable rewards (task.type=grpo).

    python scripts/make_arith_rl.py                         # rewrites frod_cli/tasks/data/arith_rl_tiny.jsonl
    python scripts/make_arith_rl.py --rows 3000 --steps 1-2 --seed 7 --layout chat --out data/arith_rl.jsonl

Each row is a problem in our own wording (a person, a kind of object, one or two operations among + - x /,
numbers drawn so that every intermediate result is a whole number >= 0) and its answer, an integer as a string:
  --layout prompt  {"prompt": "<problem> Answer with a number.", "answer": "17", "steps": 1}
  --layout chat    {"messages": [{"role": "user", "content": "<problem> ..."}], "answer": "17", "steps": 1}
`steps` counts the operations. Deterministic: one seeded random.Random and no clock, so rerunning with the same
arguments reproduces the file byte for byte. No two rows share a problem text.

The packaged arith_rl_tiny.jsonl (96 one-step problems with small numbers, prompt layout) is what the GRPO smoke
run trains a tiny random LLaMA on. Such a model never solves them: the rising reward comes from a format reward,
`\b\d+\b` (a number in the completion), with the math reward recorded beside it (near 0). Measured on tiny:llama
(frod_cli.rl.step collect + batch_loss in a plain AdamW loop, lr 5e-2, G = 8, 8 prompts per step, 8 new
tokens, 20 steps, sparse_rate 0.05 for frod; mean total reward of the first five steps ->
the last five): frod 0.31 -> 1.00, lora 0.32 -> 0.97, frod on an NF4 base 0.18 -> 0.97; with the model built at
config_overrides={initializer_range: 1.0}. At the default init (std 0.02) the next-token distribution is nearly
uniform (entropy 10.32 nats of ln 30522 = 10.33) and stays so whatever the adapted layers do (the LM head and the
final norm are frozen: a logit moves by at most |h| |w_j| ~ 0.6), and 30 such steps of frod moved nothing
(0.43 -> 0.44 with the format pattern \d); at std 1.0 the entropy is 2.2 nats and the policy can move.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

DATA = Path(__file__).resolve().parent.parent / "frod_cli" / "tasks" / "data"
NAMES = ("Ada", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mo", "Nia", "Oto",
         "Pia", "Quin", "Rui", "Sol", "Tam")
ITEMS = ("apples", "marbles", "stamps", "pencils", "shells", "cards", "coins", "books", "buttons", "stickers")
INSTRUCTION = "Answer with a number."

# one operation: draws its operand for the current value v and returns (its sentence, the new value)
Op = Callable[[random.Random, int, str, str, int], Tuple[str, int]]


def _add(rng: random.Random, v: int, name: str, item: str, hi: int) -> Tuple[str, int]:
    b = rng.randint(1, hi)
    return rng.choice(["Then {n} finds {b} more {i}.", "A friend gives {n} {b} more {i}."]).format(n=name, b=b, i=item), v + b


def _sub(rng: random.Random, v: int, name: str, item: str, hi: int) -> Tuple[str, int]:
    if v < 1:
        return _add(rng, v, name, item, hi)
    b = rng.randint(1, v)
    return rng.choice(["Then {n} gives away {b} {i}.", "Then {n} loses {b} {i}."]).format(n=name, b=b, i=item), v - b


def _mul(rng: random.Random, v: int, name: str, item: str, hi: int) -> Tuple[str, int]:
    k = rng.randint(2, 4)
    word = {2: "twice", 3: "three times", 4: "four times"}[k]
    return f"Then {name} ends up with {word} as many {item}.", v * k


def _div(rng: random.Random, v: int, name: str, item: str, hi: int) -> Tuple[str, int]:
    ks = [k for k in (2, 3, 4, 5) if v % k == 0 and v > 0]
    if not ks:
        return _add(rng, v, name, item, hi)
    k = rng.choice(ks)
    return f"Then {name} shares the {item} equally among {k} boxes and keeps one box.", v // k


OPS: List[Op] = [_add, _sub, _mul, _div]


def problem(rng: random.Random, steps: int, hi: int) -> Dict[str, object]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    v = rng.randint(1, hi)
    parts = [f"{name} has {v} {item}."]
    for _ in range(steps):
        text, v = rng.choice(OPS)(rng, v, name, item, hi)
        parts.append(text)
    parts.append(f"How many {item} does {name} have now? {INSTRUCTION}")
    return {"text": " ".join(parts), "answer": str(v), "steps": steps}


def rows(n: int, seed: int, step_range: Tuple[int, int], hi: int, layout: str) -> List[Dict[str, object]]:
    rng, seen, out = random.Random(seed), set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n:
            raise SystemExit(f"only {len(out)} distinct problems for --rows {n}: widen --max-number or --steps")
        p = problem(rng, rng.randint(*step_range), hi)
        if p["text"] in seen:
            continue
        seen.add(p["text"])
        first = {"prompt": p["text"]} if layout == "prompt" else {"messages": [{"role": "user", "content": p["text"]}]}
        out.append({**first, "answer": p["answer"], "steps": p["steps"]})
    return out


def parse_steps(text: str) -> Tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes N or N-M, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"--steps needs 1 <= N <= M, got {text!r}")
    return low, high


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--seed", type=int, default=20260128)
    ap.add_argument("--steps", type=parse_steps, default=(1, 1), help="operations per problem: N or N-M")
    ap.add_argument("--max-number", type=int, default=20, help="largest starting value and addend")
    ap.add_argument("--layout", choices=("prompt", "chat"), default="prompt")
    ap.add_argument("--out", default=str(DATA / "arith_rl_tiny.jsonl"))
    args = ap.parse_args(argv)
    if args.rows < 1 or args.max_number < 1:
        ap.error("--rows and --max-number must be at least 1")
    data = rows(args.rows, args.seed, args.steps, args.max_number, args.layout)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    tmp.replace(out)  # atomic: a reader never sees half a file
    print(f"wrote {len(data)} problems to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
