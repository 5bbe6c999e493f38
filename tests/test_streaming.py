"""task.streaming (frod_cli/tasks/streaming.py, frod_cli/training/streaming.py): the streamed examples are the
ones the in-memory path builds (packing included), a stream restarted at a saved position continues exactly,
malformed rows met while training are refused or counted, a mixture of streams draws by weight, and a streamed
run killed with SIGKILL resumes to the uninterrupted run's values (1e-6)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.cli import main, run_verb
from frod_cli.config import ModelConfig
from frod_cli.tasks import task_config
from frod_cli.models import load_model
from frod_cli.tasks import get_task
from frod_cli.training import checkpoint as ck
from frod_cli.training.streaming import StreamBatches
from test_reliability import assert_rows_close, final_values, jsonl_rows, kill_seed, train_then_kill

DATA = Path(__file__).resolve().parents[1] / "frod_cli" / "tasks" / "data"


def make_task(**over):
    base = {"type": "causal_lm", "name": "s", "objective": "loss", "objective_mode": "min", "max_length": 64,
            "test_split": None, "test_fraction": 0.0}
    return get_task("causal_lm")(task_config(base["type"], **{**base, **over}), 0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    rows = (DATA / "sft_tiny.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(rows[:200]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[200:216]) + "\n")
    return {"train": str(d / "train.jsonl"), "validation": str(d / "val.jsonl"), "dir": d}


@pytest.fixture(scope="module")
def tok():
    return load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), make_task())[1]


def both(files, tok, **over):
    """(the in-memory encoded train split, the streamed examples of the first pass) of the same files."""
    kw = dict(source="local", data_files={"train": files["train"], "validation": files["validation"]}, **over)
    plain = make_task(**kw)
    mem = plain.encode(plain.load_data(), tok)["train"]
    streamed = make_task(streaming=True, shuffle_buffer=0, **kw)
    stream = streamed.encode(streamed.load_data(), tok)["train"]
    return mem, [ex for _, ex, _ in stream.examples(0, 0)]


def test_streamed_examples_are_the_in_memory_ones(files, tok):
    mem, streamed = both(files, tok)
    assert len(streamed) == len(mem) == 200
    assert [e["input_ids"] for e in streamed] == mem["input_ids"] and [e["labels"] for e in streamed] == mem["labels"]
    mem, streamed = both(files, tok, packing=True)  # packing as the examples come: the same blocks
    assert len(streamed) == len(mem) < 200
    assert [e["input_ids"] for e in streamed] == mem["input_ids"] and [e["position_ids"] for e in streamed] == mem["position_ids"]
    assert [e["labels"] for e in streamed] == mem["labels"]


@pytest.mark.parametrize("packing", [False, True])
def test_a_restarted_stream_continues_exactly(files, tok, packing):
    task = make_task(source="local", data_files={"train": files["train"]}, streaming=True, max_eval_samples=10,
                     shuffle_buffer=32, packing=packing)
    stream = task.encode(task.load_data(), tok)["train"]
    collate = task.collate(tok)
    run = StreamBatches(stream, 4, 2, 1, 0, collate).windows(state := {})
    windows = [next(run) for _ in range(40)]  # more than a pass (190 rows): the second pass is reshuffled
    assert state["epoch"] >= 1
    for k in (1, 7, 23, 39):
        saved = {}
        again = StreamBatches(stream, 4, 2, 1, 0, collate).windows(saved)
        for _ in range(k):
            next(again)
        resumed = StreamBatches(stream, 4, 2, 1, 0, collate).windows(json.loads(json.dumps(saved)))  # via state.json
        for want in windows[k:k + 2]:
            got = next(resumed)
            assert all(torch.equal(a[key], b[key]) for a, b in zip(got, want) for key in a)
    assert state["counts"]["rows"] >= 190 and state["counts"]["source:0"] == state["counts"]["examples"]


def test_two_processes_take_disjoint_slices_of_one_stream(files, tok):
    task = make_task(source="local", data_files={"train": files["train"]}, streaming=True, max_eval_samples=10,
                     shuffle_buffer=0)
    stream, collate = task.encode(task.load_data(), tok)["train"], task.collate(tok)
    one = next(StreamBatches(stream, 4, 1, 1, 0, collate).windows({}))[0]
    halves = [next(StreamBatches(stream, 2, 1, 2, r, collate).windows({}))[0] for r in (0, 1)]
    width = one["input_ids"].shape[1]
    rows = [h["input_ids"][i, : h["attention_mask"][i].sum()] for h in halves for i in range(2)]
    assert all(torch.equal(r, one["input_ids"][i, : len(r)]) for i, r in enumerate(rows)) and width >= max(map(len, rows))


def test_malformed_rows_met_while_training(files, tok, tmp_path):
    rows = [json.loads(line) for line in Path(files["train"]).read_text().splitlines()[:20]]
    rows[13] = {"instruction": None, "output": "x"}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(source="local", data_files={"train": str(path), "validation": files["validation"]}, streaming=True,
              shuffle_buffer=0)
    task = make_task(**kw)
    stream = task.encode(task.load_data(), tok)["train"]
    with pytest.raises(FrodCliError) as e:
        list(stream.examples(0, 0))
    assert str(e.value) == ("training stream, row 14: 'instruction' is missing (fix it, or task.skip_malformed=true "
                            "drops such rows)")
    task = make_task(skip_malformed=True, **kw)
    state = {}
    gen = StreamBatches(task.encode(task.load_data(), tok)["train"], 19, 1, 1, 0, task.collate(tok)).windows(state)
    next(gen)
    assert state["counts"] == {"rows": 20, "malformed": 1, "examples": 19, "truncated": 0, "cut": 0, "turns_dropped": 0,
                               "converted": 0, "source:0": 19}


def test_a_mixture_of_streams(files, tok, tmp_path):
    share = tmp_path / "share.jsonl"
    share.write_text((DATA / "sft_tiny_sharegpt.jsonl").read_text())
    task = make_task(streaming=True, shuffle_buffer=16, chat_template=None, max_eval_samples=4, mixture=[
        {"name": "arith", "data_files": {"train": files["train"]}, "weight": 0.75},
        {"name": "share", "data_files": {"train": str(share)}, "weight": 0.25, "data_format": "text",
         "text_fields": ["conversations"]}])
    with pytest.raises(FrodCliError) as e:  # a list of turns is no text: the held-out rows are read up front
        task.load_data()
    assert "source 'share' split 'validation': 4 of 4 rows cannot be read; the first, row 1: 'conversations' is a list" in str(e.value)
    task = make_task(streaming=True, shuffle_buffer=16, max_eval_samples=4, chat_template="chatml", mixture=[
        {"name": "arith", "data_files": {"train": files["train"]}, "weight": 0.75},
        {"name": "share", "data_files": {"train": str(share)}, "weight": 0.25}])
    model_tok = load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), task)[1]
    data = task.load_data()
    assert [len(data["validation"].filter(lambda s, i=i: s == i, input_columns="_source")) for i in (0, 1)] == [4, 4]
    counts = {}
    for _, _, c in task.encode(data, model_tok)["train"].examples(0, 0):
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    # first_exhausted: the 60 conversations left after validation run out first, near 60 / 0.25 draws
    assert counts["source:1"] == 60 and 100 < counts["source:0"] < 260


def test_streaming_needs_max_steps(files, tmp_path, capsys):
    assert main(["train", "recipe=sft_smoke", "task.streaming=true", "train.max_steps=-1", "train.epochs=1",
                 f"task.data_files.train={files['train']}", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "task.streaming=true needs train.max_steps" in err[0]
    with pytest.raises(FrodCliError) as e:
        make_task(streaming=True, dedupe=True)
    assert "not with task.streaming=true" in str(e.value)


def test_a_stream_without_validation_holds_out_its_first_rows(files, tmp_path, caplog):
    """No validation split and no task.max_eval_samples: the first DEFAULT_HOLDOUT (100) rows of the 200 are
    held out (logged), the stream trains on the rest; a stream too short for that is refused in one line."""
    from frod_cli.tasks.streaming import DEFAULT_HOLDOUT

    task = make_task(source="local", data_files={"train": files["train"]}, streaming=True, validation_split=None,
                     shuffle_buffer=0)
    with caplog.at_level("INFO", logger="frod_cli.tasks.causal_lm"):
        data = task.load_data()
    rows = (DATA / "sft_tiny.jsonl").read_text().splitlines()
    assert DEFAULT_HOLDOUT == 100 and len(data["validation"]) == 100
    assert data["validation"][0]["reference"] == json.loads(rows[0])["output"]
    assert "its first 100 training rows are held out for validation (the default" in caplog.text
    first = next(iter(data["train"].rows(0, 0)))[1]
    assert first["reference"] == json.loads(rows[100])["output"]
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(rows[:100]) + "\n")
    task = make_task(source="local", data_files={"train": str(short)}, streaming=True, validation_split=None)
    with pytest.raises(FrodCliError) as e:
        task.load_data()
    assert "holds 100 rows: holding out the first 100 for validation leaves none to train on" in str(e.value)


# -------------------------------------------------------------------------------------------- kill, resume
def streamed(files, *extra):
    return ["recipe=sft_smoke", "task.streaming=true", "task.packing=true", "task.shuffle_buffer=64",
            f"task.data_files.train={files['train']}", f"task.data_files.validation={files['validation']}",
            "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=1", "train.keep_checkpoints=true",
            "train.batch_size=4", "train.grad_accum=2", "train.log_every=1", "train.progress=false",
            "train.save_merged=false", "task.generation.max_examples=1", "task.generation.max_new_tokens=1", "task.max_eval_samples=8", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_a_streamed_run_matches_uninterrupted(files, tmp_path):
    reference = tmp_path / "reference"
    code, _ = run_verb("train", [*streamed(files), f"hydra.run.dir={reference}"])
    assert code == 0
    run = tmp_path / "killed"
    seed = kill_seed()
    kill_at = random.Random(seed).randint(2, 4)
    print(f"FROD_TEST_SEED={seed}: kill after step {kill_at}")
    train_then_kill([*streamed(files), f"hydra.run.dir={run}"], run / "metrics.jsonl", kill_at, tmp_path)
    assert not (run / "metrics.json").exists() and ck.latest_checkpoint(str(run)) is not None
    code, _ = run_verb("train", [*streamed(files), f"resume={run}"])
    assert code == 0
    m, ref_m = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert m["resumed_from"] and m["steps"] == 6
    ref, got = final_values(reference), final_values(run)
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
    # the killed run trained its first steps in a 1-thread process: float32 sums in another order, so the logged
    # metrics agree to 1e-6 relative (perplexity = exp(loss) of a random model is ~3e4: an absolute 1e-6 is bitwise)
    got_rows, ref_rows = jsonl_rows(run), jsonl_rows(reference)
    assert_rows_close([{k: v for k, v in r.items() if k != "perplexity"} for r in got_rows],
                      [{k: v for k, v in r.items() if k != "perplexity"} for r in ref_rows], 1e-6)
    ppl = lambda rows: [r["perplexity"] for r in rows if "perplexity" in r]  # noqa: E731
    assert ppl(got_rows) == pytest.approx(ppl(ref_rows), rel=1e-6) and len(ppl(ref_rows)) == 2
    assert m["validation"] == pytest.approx(ref_m["validation"], rel=1e-6)
    assert m["data_counts"]["stream"] == ref_m["data_counts"]["stream"]  # the counts travelled with the position
    # frod eval on a streamed run: the default splits are those it has (validation: a stream holds no test split)
    assert main(["eval", f"path={reference}", "use_adapter=true"]) == 0
    ev = json.loads((reference / "eval.json").read_text())
    assert "test" not in ev and ev["validation"]["loss"] == pytest.approx(ref_m["validation"]["loss"], rel=1e-5)
