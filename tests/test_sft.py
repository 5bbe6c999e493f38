"""recipe=sft_smoke end to end (a tiny random LLaMA, the packaged instruction set, offline): the run
directory, predictions.jsonl, merged/ generating exactly what the adapted model generates (greedy), and
`frod generate` on the run. Plus a test split taken from another data set (task.test_dataset)."""
from __future__ import annotations

import json

import pytest
import torch

from frod_cli.cli import main, run_verb

pytestmark = pytest.mark.slow
PROMPTS = ["What is 2 plus 3?", "Is 7 even or odd? Answer with one word.", "Name a colour."]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "run"
    code, value = run_verb("train", ["recipe=sft_smoke", "train.progress=false", f"hydra.run.dir={run}"])
    assert code == 0
    return run, value


def test_sft_smoke_writes_generation_metrics_and_predictions(sft_run):
    run, value = sft_run
    m = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert {"loss", "perplexity", "exact_match"} <= set(m[split]), m[split]
        assert m[split]["perplexity"] == pytest.approx(torch.tensor(m[split]["loss"]).exp().item(), rel=1e-4)
    assert value == pytest.approx(m["objective_value"]) and m["objective"] == "loss"
    rows = [json.loads(l) for l in (run / "predictions.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"validation", "test"}
    assert {"prompt", "prediction", "extracted", "reference", "correct"} <= set(rows[0])
    assert m["merge_max_abs_diff"] < 1e-4


def test_merged_generates_what_the_adapted_model_generates(sft_run):
    """merged/ is a plain model: AutoModelForCausalLM + its tokenizer, greedy, token for token the same as
    the base model + adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from frod_cli.decoding import encode_prompt, generate_ids
    from frod_cli.training.builders import load_trained

    run, _ = sft_run
    plain = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    tok = AutoTokenizer.from_pretrained(run / "merged")
    trained = load_trained(str(run), use_adapter=True, load_data=False)
    adapted, tok2, what = trained.model, trained.preprocessor, trained.what
    assert "adapter" in what
    prompts = [encode_prompt(tok, f"### Instruction:\n{p}\n\n### Response:\n") for p in PROMPTS]
    assert prompts == [encode_prompt(tok2, f"### Instruction:\n{p}\n\n### Response:\n") for p in PROMPTS]
    settings = dict(max_new_tokens=8, do_sample=False)
    a = generate_ids(plain, tok, prompts, batch_size=3, **settings)
    b = generate_ids(adapted.eval(), tok2, prompts, batch_size=3, **settings)
    assert a == b and all(len(x) for x in a)
    # ... and the comparison means something: training moved the model away from its base
    from frod_cli.frod import disable_adapter

    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        merged_logits, adapted_logits = plain(input_ids=ids).logits, adapted(input_ids=ids).logits
        with disable_adapter(adapted):
            base_logits = adapted(input_ids=ids).logits
    assert (merged_logits - adapted_logits).abs().max() < 1e-4
    assert (adapted_logits - base_logits).abs().max() > 1e-3


def test_frod_generate_on_the_run(sft_run, capsys):
    run, _ = sft_run
    assert main(["generate", f"path={run}", "prompt=Hello", "max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert "Hello" in out and len(out.strip().splitlines()) >= 2


def test_frod_generate_refuses_bad_input(sft_run, tmp_path, capsys):
    run, _ = sft_run
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args in ([f"path={tmp_path / 'nope'}", "prompt=Hi"], [f"path={run}", f"prompts={empty}"], [f"path={run}"]):
        assert main(["generate", *args]) == 2, args
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(err) == 1 and "Traceback" not in err[0], err


def test_test_split_from_another_data_set(tmp_path):
    """task.test_dataset: train on one data set, score on another's split with its columns renamed (the
    MetaMathQA -> GSM8K protocol, with local stand-ins in their schemas)."""
    from omegaconf import OmegaConf

    from frod_cli.tasks import get_task, task_config

    train = tmp_path / "metamath.jsonl"
    train.write_text("".join(json.dumps({"query": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}. The answer is: {i + 1}"})
                             + "\n" for i in range(40)))
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"Tom has {i} apples and gets 2. How many?",
                                       "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n" for i in range(6)))
    cfg = task_config("causal_lm", **dict(
        name="mm", source="local", data_files={"train": str(train)}, data_format="instruction",
        instruction_field="query", input_field=None, output_field="response", validation_split=None,
        test_split="test", test_dataset=str(gsm), test_dataset_split="test",
        test_rename={"question": "query", "answer": "response"}, answer_pattern="last_number",
        objective="exact_match"))
    data = get_task("causal_lm")(cfg, 0).load_data()
    assert len(data["test"]) == 6 and data["test"][0]["messages"][0]["content"].startswith("Tom has")
    assert data["test"][0]["reference"] == "0 + 2 = 2\n#### 2"  # the renamed answer column is the reference
    assert len(data["train"]) + len(data["validation"]) == 40
    bad = OmegaConf.merge(cfg, {"test_rename": {"nope": "query"}})
    with pytest.raises(ValueError, match="task.test_rename names 'nope'"):
        get_task("causal_lm")(bad, 0).load_data()


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]}
    for a in range(6) for b in range(5)
]


def test_chat_data_on_the_offline_chat_model_trains_evaluates_merges_generates(tmp_path, capsys):
    """The user's own chat file (messages) on tiny:llama-chat (a ChatML template, offline): frod train, eval,
    merge and generate all run, and merged/ keeps the template."""
    from transformers import AutoTokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    run = tmp_path / "run"
    code, _ = run_verb("train", ["recipe=sft_smoke", "model=tiny_llama_chat", "task.data_format=chat",
                                 f"task.data_files.train={data}", "train.max_steps=2", "train.eval_every=2",
                                 "train.progress=false", f"hydra.run.dir={run}"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"task.data_files.train: 30 rows from {data}" in out  # the user's file, not the packaged set
    m = json.loads((run / "metrics.json").read_text())
    assert m["data"] == "chat.jsonl" and {"loss", "exact_match"} <= set(m["test"])
    assert m["task"] == "chat" and "tiny:llama-chat on chat with frod" in out  # the data's name, not "sft_tiny"
    assert AutoTokenizer.from_pretrained(str(run / "merged")).chat_template
    assert main(["eval", f"path={run}", "use_adapter=true", f"output={tmp_path / 'eval.json'}"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["test"]["loss"] == pytest.approx(m["test"]["loss"], rel=1e-4)
    assert main(["merge", f"run={run}", f"output={tmp_path / 'merged'}"]) == 0
    assert (tmp_path / "merged" / "merge.json").is_file() and not (run / "merge.json").exists()
    assert main(["generate", f"path={tmp_path / 'merged'}", "prompt=What is 2 plus 3?", "max_new_tokens=4",
                 f"output={tmp_path / 'answers.jsonl'}"]) == 0
    assert json.loads((tmp_path / "answers.jsonl").read_text())["prompt"] == "What is 2 plus 3?"


def test_a_function_calling_sharegpt_file_trains_on_every_conversation(tmp_path, monkeypatch, capsys):
    """The issue's command, as a new user runs it from a folder of their own: the packaged function-calling
    conversations in ShareGPT form (function_call / observation turns, one to three exchanges) at sft_smoke's
    max_length (64): no conversation is dropped; the long ones are cut at a turn boundary or truncated inside
    their first trained turn, counted in the log and in metrics.json, which names the data after the file."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    packaged = Path(__file__).resolve().parents[1] / "frod_cli" / "tasks" / "data" / "tools_tiny_sharegpt.jsonl"
    Path("calls.jsonl").write_text(packaged.read_text())
    code, _ = run_verb("train", ["recipe=sft_smoke", "task.data_format=sharegpt", "task.chat_template=chatml",
                                 "task.data_files.train=calls.jsonl", "train.max_steps=2", "train.eval_every=2",
                                 "train.progress=false", "task.generation.max_examples=2",
                                 "task.generation.max_new_tokens=4", "hydra.run.dir=run"])
    assert code == 0
    out = capsys.readouterr().out
    m = json.loads(Path("run/metrics.json").read_text())
    splits = m["data_counts"]["splits"]
    assert sum(s["kept"] for s in splits.values()) == 32 and all(s["dropped"] == 0 for s in splits.values())
    assert sum(s["cut"] for s in splits.values()) > 0 and sum(s["turns_dropped"] for s in splits.values()) > 0
    assert "examples longer than task.max_length=64" in out and "0 dropped" in out
    assert m["task"] == "calls" and m["data"] == "calls.jsonl" and Path("run/loss.png").is_file()
    records = [json.loads(line) for line in Path("run/predictions.jsonl").read_text().splitlines()]
    assert records and all(r["reference"] for r in records)


def test_a_csv_of_numbers_trains(tmp_path, capsys):
    """prompt/completion columns whose completions are numbers (and a boolean column): written out as text,
    the count logged, and the run trains."""
    data = tmp_path / "squares.csv"
    data.write_text("prompt,completion\n" + "".join(f"{i} squared is,{i * i}\n" for i in range(40)))
    run = tmp_path / "run"
    code, _ = run_verb("train", ["recipe=sft_smoke", f"task.data_files.train={data}", "train.max_steps=2",
                                 "train.eval_every=2", "train.progress=false", "task.generation.max_examples=2",
                                 "task.generation.max_new_tokens=4", f"hydra.run.dir={run}"])
    assert code == 0
    out = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["data_counts"]["sources"]["squares"]["read"]["train"] == {"rows": 40, "malformed": 0, "converted": 40}
    assert "split 'train': 40 number or boolean cells written out as text" in out
    assert m["data_counts"]["sources"]["squares"]["format"] == "prompt_completion" and m["task"] == "squares"
