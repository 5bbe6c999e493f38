"""Weighted mixtures (task.mixture, frod_cli/tasks/mixture.py): the draw follows the weights (binomial check),
is seeded, stops by the named rule, keeps each source's validation split and reports per source; bad mixtures
are refused in one line before any data is read. The end-to-end run of a mixture is in tests/test_layouts.py."""
from __future__ import annotations

import collections
import json
import math

import pytest
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.cli import main
from frod_cli.config import ModelConfig
from frod_cli.tasks import task_config
from frod_cli.models import load_model
from frod_cli.tasks import get_task


def make_task(seed=0, **over):
    base = {"type": "causal_lm", "name": "mix", "objective": "loss", "objective_mode": "min", "max_length": 48,
            "validation_split": None, "test_split": None}
    return get_task("causal_lm")(task_config(base["type"], **{**base, **over}), seed)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    big = [{"instruction": f"What is {i} plus 1?", "output": str(i + 1)} for i in range(1000)]
    chats = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]} for i in range(1000)]
    return {"a": write(d / "arith.jsonl", big), "b": write(d / "talk.jsonl", chats),
            "small": write(d / "small.jsonl", big[:30])}


def mixture(files, wa=0.8, wb=0.2, **extra):
    return [{"data_files": {"train": files["a"]}, "weight": wa, **extra}, {"name": "talk", "data_files": {"train": files["b"]},
                                                                          "weight": wb}]


def test_draws_follow_the_weights(files):
    data = make_task(mixture=mixture(files)).load_data()
    src = data["train"]["_source"]
    # before any source runs out, each draw is source b with probability 0.2: the first K are binomial
    k, p = 500, 0.2
    got = sum(src[:k])
    assert abs(got - k * p) <= 3 * math.sqrt(k * p * (1 - p)), got
    counts = collections.Counter(src)
    # first_exhausted: the mixture ends when source a (800 training rows, drawn 4x as often) runs out
    assert counts[0] == 800 and counts[1] < 800
    n = len(src)
    assert abs(counts[1] - n * p) <= 3 * math.sqrt(n * p * (1 - p)), counts
    # each source keeps its own validation split (10% of its rows), concatenated with its source named
    assert collections.Counter(data["validation"]["_source"]) == {0: 100, 1: 100}


def test_the_same_seed_gives_the_same_order_and_another_seed_another(files):
    a = make_task(mixture=mixture(files)).load_data()["train"]
    b = make_task(mixture=mixture(files)).load_data()["train"]
    c = make_task(seed=1, mixture=mixture(files)).load_data()["train"]
    key = lambda ds: list(zip(ds["_source"], ds["_row"]))  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)


def test_all_exhausted_repeats_the_smaller_source(files):
    mix = [{"data_files": {"train": files["small"]}, "weight": 0.5}, {"name": "talk", "data_files": {"train": files["b"]}, "weight": 0.5}]
    first = collections.Counter(make_task(mixture=mix).load_data()["train"]["_source"])
    every = make_task(mixture=mix, mixture_stop="all_exhausted").load_data()["train"]
    counts = collections.Counter(every["_source"])
    assert first[0] == 24 and first[1] < 100  # stops when the 24 small rows are used
    assert counts[1] == 800 and counts[0] > 24  # every row of the large source; the small one repeats
    assert len(set(every.filter(lambda s: s == 0, input_columns="_source")["_row"])) == 24


def test_per_source_metrics_and_counts(files):
    from accelerate import Accelerator

    from frod_cli.training.builders import make_loader

    task = make_task(mixture=[{"data_files": {"train": files["small"]}, "weight": 1},
                              {"name": "talk", "data_files": {"train": files["b"]}, "max_train_samples": 20,
                               "max_eval_samples": 6, "weight": 1}],
                     chat_template="chatml", generation={"max_examples": 2, "max_new_tokens": 2})
    model, tok = load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), task)
    enc = task.encode(task.load_data(), tok)
    stats = task.data_stats()
    assert {k: v["format"] for k, v in stats["sources"].items()} == {"small": "instruction", "talk": "sharegpt"}
    assert sum(v["train_examples"] for v in stats["sources"].values()) == len(enc["train"])
    loader = make_loader(enc["validation"], 4, task.collate(tok))
    metrics, records = task.evaluate(model, enc["validation"], loader, Accelerator(cpu=True))
    assert {"small/loss", "talk/loss", "small/exact_match", "talk/exact_match", "loss", "exact_match"} <= set(metrics)
    # the overall loss is the token-weighted mean of the sources' losses
    tokens = {s: sum(sum(t != -100 for t in ex["labels"][1:]) for ex in enc["validation"] if ex["_source"] == i)
              for i, s in enumerate(["small", "talk"])}
    mean = sum(metrics[f"{s}/loss"] * n for s, n in tokens.items()) / sum(tokens.values())
    assert metrics["loss"] == pytest.approx(mean, rel=1e-6)
    assert collections.Counter(r["source"] for r in records) == {"small": 2, "talk": 2}


BAD = [
    ("weight_zero", lambda f: [{"data_files": {"train": f["a"]}, "weight": 0}], "has weight 0: a weight is a number > 0"),
    ("weight_negative", lambda f: [{"data_files": {"train": f["a"]}, "weight": -0.5}], "weight -0.5"),
    ("weight_not_a_number", lambda f: [{"data_files": {"train": f["a"]}, "weight": "heavy"}], "weight 'heavy'"),
    ("weight_naming_no_source", lambda f: [{"weight": 0.7}], "task.mixture[0] (weight 0.7) names no data"),
    ("unknown_key", lambda f: [{"data_files": {"train": f["a"]}, "wieght": 1}], "has key 'wieght', not a key of one source"),
    ("run_wide_key", lambda f: [{"data_files": {"train": f["a"]}, "max_length": 9}], "has key 'max_length'"),
    ("same_name_twice", lambda f: [{"data_files": {"train": f["a"]}}, {"data_files": {"train": f["a"]}}], "names 'arith' twice"),
    ("missing_file", lambda f: [{"data_files": {"train": f["a"] + ".gone"}}], "task.mixture[0]: data file for split 'train' not found"),
    ("wrong_type", lambda f: [{"data_files": {"train": f["a"]}, "validation_fraction": "most"}], "task.mixture[0]: Value 'most'"),
]


@pytest.mark.parametrize("case, entries, expected", BAD, ids=[c[0] for c in BAD])
def test_bad_mixtures_are_one_line(case, entries, expected, files):
    with pytest.raises(FrodCliError) as e:
        make_task(mixture=entries(files))
    msg = str(e.value)
    assert "\n" not in msg and expected in msg, msg


def test_a_source_that_gives_no_example(tmp_path, files):
    bad = write(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "a"}]}] * 5)
    task = make_task(mixture=[{"data_files": {"train": files["small"]}}, {"data_files": {"train": bad}, "skip_malformed": True}])
    with pytest.raises(FrodCliError) as e:
        task.load_data()
    assert "source 'bad' split 'train' gives no example: all 5 rows are malformed" in str(e.value)
    with pytest.raises(FrodCliError) as e:
        make_task(mixture=mixture(files), mixture_stop="longest").load_data()
    assert "unknown task.mixture_stop 'longest'" in str(e.value)


def test_a_bad_mixture_on_the_command_line_exits_2(files, tmp_path, capsys):
    assert main(["train", "recipe=sft_smoke", f"task.mixture=[{{data_files: {{train: {files['a']}}}, weight: 0}}]",
                 f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "weight 0" in err[0] and not (tmp_path / "run").exists()


def test_the_mixture_recipe_reads_its_sources():
    from conftest import compose_train

    from frod_cli.tasks.sources import describe_source

    cfg = compose_train(["recipe=sft_mixture"])
    task = get_task("causal_lm")(cfg.task, 0)
    assert [(s.name, s.weight) for s in task.sources] == [("instructions", 0.7), ("conversations", 0.3)]
    data = task.load_data()
    counts = collections.Counter(data["train"]["_source"])
    assert task.formats == ["instruction", "sharegpt"] and counts[1] == 52  # first_exhausted: the 52 conversations
    assert describe_source(cfg.task) == "instructions (0.7) + conversations (0.3)"  # metrics.json, plot titles
