"""Data-path benchmark: reading + tokenizing N ShareGPT rows for causal_lm, then the same again (the next run on the
same data and settings: datasets' cache), and streaming's time to the first batch and per batch.

    .venv/bin/python scripts/bench_data.py [--rows 20000] [--out bench_data.json]

Rows: the packaged ShareGPT conversations repeated with one more exchange each (4 turns), local JSON Lines, the
tiny:llama-chat tokenizer (MiniLM's WordPiece + ChatML), max_length 128. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "frod_cli" / "tasks" / "data"


def write_rows(path: Path, n: int) -> None:
    base = [json.loads(line) for line in (DATA / "sft_tiny_sharegpt.jsonl").read_text().splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = base[i % len(base)]["conversations"] + [{"from": "human", "value": f"And {i}?"},
                                                            {"from": "gpt", "value": str(i)}]
            f.write(json.dumps({"conversations": turns}) + "\n")


def main() -> None:
    import datasets
    from omegaconf import OmegaConf

    from frod_cli.config import ModelConfig, TaskConfig
    from frod_cli.models import load_preprocessor
    from frod_cli.tasks import get_task
    from frod_cli.training.streaming import StreamBatches

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--out", default="bench_data.json")
    args = ap.parse_args()
    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="frod-bench-data-"))
    path = tmp / "share.jsonl"
    write_rows(path, args.rows)

    def task(**over):
        base = {"type": "causal_lm", "name": "bench", "objective": "loss", "objective_mode": "min", "source": "local",
                "data_files": {"train": str(path)}, "max_length": 128, **over}
        return get_task("causal_lm")(OmegaConf.merge(OmegaConf.structured(TaskConfig), base), 0)

    tok = load_preprocessor(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama-chat")), task())
    results = {"rows": args.rows}
    for label in ("first run", "next run (cached)"):
        t0 = time.time()
        t = task()
        data = t.load_data()
        t1 = time.time()
        t.encode(data, tok)
        results[label] = {"read_s": t1 - t0, "tokenize_s": time.time() - t1, "total_s": time.time() - t0}
    t0 = time.time()
    t = task(streaming=True, max_eval_samples=64)
    stream = t.encode(t.load_data(), tok)["train"]
    windows = StreamBatches(stream, 8, 1, 1, 0, t.collate(tok)).windows({})
    next(windows)
    first = time.time() - t0
    t1 = time.time()
    n = min(1000, args.rows // 10)
    for _ in range(n):
        next(windows)
    results["streaming"] = {"to_first_batch_s": first, "per_batch_ms": (time.time() - t1) * 1000 / n, "batches": n}
    print(f"{'rows':<28}{args.rows}")
    for label in ("first run", "next run (cached)"):
        r = results[label]
        print(f"{label:<28}read {r['read_s']:.1f} s + tokenize {r['tokenize_s']:.1f} s = {r['total_s']:.1f} s")
    s = results["streaming"]
    print(f"{'streaming':<28}first batch after {s['to_first_batch_s']:.1f} s, then {s['per_batch_ms']:.1f} ms per batch "
          f"of 8 (over {s['batches']} batches: read, tokenized, shuffled as they come)")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
