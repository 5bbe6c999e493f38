"""Write the small files of each conversation layout shipped for the causal_lm tests and the mixture recipe.

    python scripts/make_layout_files.py        # rewrites frod_cli/tasks/data/sft_tiny_{sharegpt,completions}.jsonl

Both are derived from the files scripts/make_sft_tiny.py writes, so the same conversation exists in several
layouts (tests/test_layouts.py checks that they train on the same tokens):
sft_tiny_sharegpt.jsonl     the 64 conversations of sft_tiny_chat.jsonl as ShareGPT `conversations` of
                            {from: human|gpt, value} turns; every 8th opens with a {from: system} turn.
sft_tiny_completions.jsonl  the first 96 rows of sft_tiny.jsonl as TRL prompt/completion strings
                            ("Question: <instruction>\\nAnswer:", " <output>").
Deterministic: rerunning reproduces the files byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path

from make_sft_tiny import write_jsonl  # scripts/ is on sys.path when a script runs

DATA = Path(__file__).resolve().parent.parent / "frod_cli" / "tasks" / "data"
FROM = {"user": "human", "assistant": "gpt", "system": "system"}
SYSTEM = "You are a concise assistant: answer with the bare result."


def rows(name: str) -> list:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    sharegpt = []
    for i, r in enumerate(rows("sft_tiny_chat.jsonl")):
        turns = [{"from": FROM[m["role"]], "value": m["content"]} for m in r["messages"]]
        if i % 8 == 7:
            turns.insert(0, {"from": "system", "value": SYSTEM})
        sharegpt.append({"conversations": turns})
    write_jsonl("sft_tiny_sharegpt.jsonl", sharegpt)
    completions = []
    for r in rows("sft_tiny.jsonl")[:96]:
        question = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        completions.append({"prompt": f"Question: {question}\nAnswer:", "completion": f" {r['output']}"})
    write_jsonl("sft_tiny_completions.jsonl", completions)


if __name__ == "__main__":
    main()
