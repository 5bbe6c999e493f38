"""lm-evaluation-harness through `frod eval path=<run> harness.tasks=[...]` (frod_cli/harness/).

Offline: the tests write their own harness task (a YAML + a small JSONL, found through harness.include_path, which
lm-eval's TaskManager reads) and score a tiny LLaMA run with it. The harness's accuracy is checked against a count
this test makes itself: every choice's log-likelihood computed with plain transformers, argmax == gold."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import one_error_line, train_run

pytestmark = pytest.mark.slow

ROWS = [{"q": f"What is {a} plus {b}?", "choices": [str(a + b), str(a * b + 1), str(a + b + 2)], "gold": i % 3}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (9, 0), (8, 5)])]
TASK_YAML = """task: frod_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # initializer_range=0.5: a random model whose choices get clearly different log-likelihoods (at the default
    # 0.02 a 2-step tiny model scores every choice nearly alike, and a count could not tell right from wrong)
    return train_run(tmp_path_factory, "harness_run", [
        "recipe=sft_smoke", "train.max_steps=2", "train.eval_every=2", "train.progress=false",
        "task.generation.max_examples=2", "task.max_train_samples=32", "+model.config_overrides.initializer_range=0.5",
        "train.log_with=[tensorboard]"])[0]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness_tasks")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "frod_test_mc.yaml").write_text(TASK_YAML.format(rows=d / "rows.jsonl"))
    return d


def harness(run, tasks, out, *extra):
    from frod_cli.cli import run_verb

    code, record = run_verb("eval", [f"path={run}", "harness.tasks=[frod_test_mc]", f"harness.include_path={tasks}",
                                     "harness.log_samples=true", f"output={out}", *extra])
    assert code == 0
    assert json.loads(Path(out).read_text())["results"] == record["results"]
    return record


@pytest.fixture(scope="module")
def merged(run, tasks, tmp_path_factory):
    return harness(run, tasks, tmp_path_factory.mktemp("h") / "merged.json")


@pytest.fixture(scope="module")
def unmerged(run, tasks, tmp_path_factory):
    return harness(run, tasks, tmp_path_factory.mktemp("h") / "unmerged.json", "use_adapter=true")


def own_loglikelihoods(run) -> list:
    """Each row's choices' log-likelihoods of " <choice>" after "Q: ...\\nA:", with plain transformers: merged/'s
    weights and its saved tokenizer.json (the causal template the run trained with: [CLS] as BOS, no [SEP])."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(run / "merged" / "tokenizer.json"))
    out = []
    for row in ROWS:
        context = f"Q: {row['q']}\nA:"
        ctx = tok(context).input_ids
        scores = []
        for choice in row["choices"]:
            ids = tok(context + " " + choice).input_ids
            assert ids[:len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        out.append(scores)
    return out


def test_the_harness_accuracy_equals_this_tests_own_count(run, merged):
    own = own_loglikelihoods(run)
    correct = sum(max(range(len(s)), key=s.__getitem__) == row["gold"] for s, row in zip(own, ROWS))
    assert merged["results"]["frod_test_mc"]["acc,none"] == pytest.approx(correct / len(ROWS))
    assert 0 < correct < len(ROWS)  # a count that can tell (not every row right or wrong)
    samples = sorted(merged["samples"]["frod_test_mc"], key=lambda s: s["doc_id"])
    harness_ll = [[r[0][0] for r in s["resps"]] for s in samples]
    assert harness_ll == [pytest.approx(s, abs=1e-4) for s in own]
    assert merged["model"] == "merged/" and merged["n-samples"]["frod_test_mc"]["effective"] == len(ROWS)


def test_merged_and_unmerged_give_the_same_harness_result(merged, unmerged):
    assert unmerged["model"] == "tiny:llama + frod adapter"
    assert unmerged["results"]["frod_test_mc"]["acc,none"] == merged["results"]["frod_test_mc"]["acc,none"]
    for a, b in zip(merged["samples"]["frod_test_mc"], unmerged["samples"]["frod_test_mc"]):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)


def test_the_results_reach_the_runs_trackers(run, merged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in (run / "trackers").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values[tag] = acc.Scalars(tag)[-1].value
    assert values["harness/frod_test_mc/acc"] == pytest.approx(merged["results"]["frod_test_mc"]["acc,none"])


def test_limit_and_fewshot_reach_the_harness(run, tasks, tmp_path):
    record = harness(run, tasks, tmp_path / "h.json", "harness.limit=4", "harness.num_fewshot=2", "seed=3")
    assert record["n-samples"]["frod_test_mc"]["effective"] == 4 and record["n-shot"]["frod_test_mc"] == 2
    assert record["config"]["fewshot_seed"] == 3


def test_refusals(run, tasks, tmp_path, capsys):
    from frod_cli.cli import run_verb
    from tests.test_share import fake_run

    classifier = fake_run(run, tmp_path / "cls", **{"task.type": "seq_cls"})
    (tmp_path / "taken.json").write_text("{}")
    cases = [
        ([f"path={run}", "harness.limit=5"], "harness.limit is a setting of lm-evaluation-harness runs"),
        ([f"path={run}", "harness.tasks=[frod_arith]", "splits=[test]"], "splits chooses frod's own evaluation"),
        ([f"path={run}", "harness.tasks=[frod_arith]", "harness.limit=0"], "harness.limit must be > 0"),
        ([f"path={run}", "harness.tasks=[frod_arith]", f"harness.include_path={tmp_path / 'no'}"], "no such directory"),
        ([f"path={run}", "harness.tasks=[frod_arith]", f"output={tmp_path / 'taken.json'}"], "exists"),
        ([f"path={classifier}", "harness.tasks=[frod_arith]"], "scores causal language models"),
        ([f"path={run}", "harness.tasks=[frod_arith]", "harness.apply_chat_template=true", f"output={tmp_path / 'c'}"],
         "has no chat template"),
    ]
    for args, expected in cases:
        code, _ = run_verb("eval", args)
        assert code == 2 and expected in one_error_line(capsys), args
