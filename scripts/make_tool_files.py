"""Write the two small function-calling sets shipped for the tool-calling tests and for trying tool data offline.

    python scripts/make_tool_files.py          # rewrites frod_cli/tasks/data/tools_tiny_{chat,sharegpt}.jsonl

tools_tiny_chat.jsonl      32 `messages` conversations in OpenAI's form: an assistant turn that calls a tool has
                           empty content and `tool_calls` [{id, type: function, function: {name, arguments}}] (the
                           arguments a JSON string, as OpenAI's API sends them), each result a {role: tool,
                           tool_call_id, content} turn. Calculator, unit and weather questions with numbers in the
                           arguments; one exchange, two or three exchanges in a row (the long ones), two calls at
                           once, a question answered without a call; every 4th opens with a short system turn.
tools_tiny_sharegpt.jsonl  the same 32 conversations in ShareGPT's form as LLaMA-Factory reads it: `conversations`
                           of {from, value} turns, a call as {from: function_call, value: '{"name": .., "arguments":
                           {..}}'} (a JSON list of them for two calls at once), a result as {from: observation}.
Neither has a `tools` column: one tool schema is some 70 tokens of JSON, more than the smoke recipe's max_length
(64); the tests write rows with tools themselves. Written by us from a fixed seed: rerunning reproduces both
files byte for byte.
"""
from __future__ import annotations

import json
import random

from make_sft_tiny import write_jsonl  # scripts/ is on sys.path when a script runs

N, SEED = 32, 20260224
SYSTEM = "Use the tools for sums, products, units and weather."
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Rome", "Dublin", "Vienna"]
SKIES = ["clear", "cloudy", "rainy", "windy"]


def exchange(rng: random.Random) -> tuple:
    """(question, [(function, arguments, result)], answer): one question and the calls that answer it."""
    kind = rng.choice(["add", "multiply", "convert", "weather"])
    if kind == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} plus {b}?", [("add", {"a": a, "b": b}, a + b)], f"{a} plus {b} is {a + b}."
    if kind == "multiply":
        a, b = rng.randint(2, 12), round(rng.uniform(1.5, 9.5), 1)
        product = round(a * b, 2)
        return f"How much is {a} times {b}?", [("multiply", {"a": a, "b": b}, product)], f"It is {product}."
    if kind == "convert":
        c = rng.randint(-10, 35)
        f = round(c * 9 / 5 + 32, 1)
        return f"{c} C in Fahrenheit?", [("celsius_to_fahrenheit", {"celsius": c}, f)], f"{c} C is {f} F."
    city, days = rng.choice(CITIES), rng.randint(1, 3)
    temp, sky = round(rng.uniform(-2, 31), 1), rng.choice(SKIES)
    result = {"temp_c": temp, "sky": sky}
    return (f"Weather in {city} for {days} day{'s' if days > 1 else ''}?", [("get_weather", {"city": city, "days": days}, result)],
            f"{city}: {sky}, {temp} C.")


def two_calls(rng: random.Random) -> tuple:
    (q1, c1, _), (q2, c2, _) = exchange(rng), exchange(rng)
    answer = " ".join(json.dumps(c[2]) for c in c1 + c2)
    return f"{q1} And {q2[0].lower()}{q2[1:]}", c1 + c2, f"Results: {answer}."


def conversation(i: int, rng: random.Random) -> list:
    """[(role, text, calls)] of conversation i: calls is [(function, arguments, result)] on an assistant turn."""
    turns = [("system", SYSTEM, [])] if i % 4 == 3 else []
    if i % 8 == 5:  # answered without a call
        turns += [("user", "Hi, what can you do?", []), ("assistant", "Sums, products, units and weather.", [])]
        return turns
    exchanges = [two_calls(rng)] if i % 8 == 6 else [exchange(rng) for _ in range(1 + (i % 3 == 2) + (i % 6 == 2))]
    for question, calls, answer in exchanges:
        turns += [("user", question, []), ("assistant", "", calls), ("assistant", answer, [])]
    return turns


def as_messages(turns: list, i: int) -> dict:
    out = []
    for role, text, calls in turns:
        if not calls:
            out.append({"role": role, "content": text})
            continue
        ids = [f"call_{i}_{len(out)}_{k}" for k in range(len(calls))]
        out.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": fn, "arguments": json.dumps(args)}}
            for cid, (fn, args, _) in zip(ids, calls)]})
        out += [{"role": "tool", "tool_call_id": cid, "content": json.dumps(result)}
                for cid, (_, _, result) in zip(ids, calls)]
    return {"messages": out}


def as_sharegpt(turns: list) -> dict:
    out = []
    for role, text, calls in turns:
        if not calls:
            out.append({"from": {"user": "human", "assistant": "gpt", "system": "system"}[role], "value": text})
            continue
        values = [{"name": fn, "arguments": args} for fn, args, _ in calls]
        out.append({"from": "function_call", "value": json.dumps(values[0] if len(values) == 1 else values)})
        out += [{"from": "observation", "value": json.dumps(result)} for _, _, result in calls]
    return {"conversations": out}


def main() -> None:
    rng = random.Random(SEED)
    convs = [conversation(i, rng) for i in range(N)]
    write_jsonl("tools_tiny_chat.jsonl", [as_messages(t, i) for i, t in enumerate(convs)])
    write_jsonl("tools_tiny_sharegpt.jsonl", [as_sharegpt(t) for t in convs])


if __name__ == "__main__":
    main()
