"""causal_lm: instruction/chat fine-tuning data, labels, packing, generation-based evaluation, `frod generate`.

Real small things: the tiny random LLaMA of frod_cli.models (MiniLM's WordPiece tokenizer, [CLS]/[SEP] as
BOS/EOS, no chat template unless a test sets one), the packaged sft_tiny data and small local JSONL files.
"""
from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.config import GenerateRunConfig, ModelConfig
from frod_cli.tasks import task_config
from frod_cli.commands.generate import run as run_generate
from frod_cli.decoding import encode_prompt, generate_ids, generate_texts
from frod_cli.models import load_model
from frod_cli.tasks import get_task
from frod_cli.tasks.answers import extract_answer, normalize_answer
from frod_cli.tasks.causal_lm import instruction_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def task_cfg(**over):
    base = {"type": "causal_lm", "name": "t", "objective": "loss", "objective_mode": "min"}
    return task_config(base["type"], **{**base, **over})


def make_task(**over):
    return get_task("causal_lm")(task_cfg(**over), 0)


def local(tmp_path, rows, name="data.jsonl", **over):
    """A task over a local JSONL file used as both train and validation."""
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return make_task(source="local", data_files={"train": str(path), "validation": str(path)}, test_split=None, **over)


@pytest.fixture(scope="module")
def tiny():
    task = make_task()
    model, tok = load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), task)
    return model, tok


@pytest.fixture
def chat_tok(tiny):
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("text, pattern, want", [
    ("  The answer is 42.  ", "full", "The answer is 42."),
    ("She has 3 apples, then 1,250.0 more", "last_number", "1250"),
    ("Step 1: 5 + 3 = 8\nStep 2: 8 * 2 = 16\n#### 16", "last_number", "16"),
    ("#### 1,000 (was 7)", "last_number", "1000"),
    ("it costs -3.50 dollars", "last_number", "-3.5"),
    ("no digits here", "last_number", None),
    ("**Positive**, because it is nice", "first_word", "positive"),
    ("... yes!", "first_word", "yes"),
    ("", "first_word", None),
    ("The answer is (B) clearly", r"regex:\(([A-D])\)", "B"),
    ("label=neutral", "regex:neutral|positive", "neutral"),
    ("nothing", r"regex:answer: (\w+)", None),
])
def test_extract_answer_rules(text, pattern, want):
    assert extract_answer(text, pattern) == want


def test_normalizer_and_bad_patterns():
    assert normalize_answer(" Paris. ") == normalize_answer("paris") == "paris"
    assert normalize_answer("42.0") == normalize_answer("42") == "42"
    assert normalize_answer('"Positive"') == "positive"
    assert normalize_answer(None) == ""
    assert normalize_answer("-7") == "-7"
    with pytest.raises(FrodCliError) as e:
        make_task(answer_pattern="last_word")
    assert "unknown task.answer_pattern 'last_word'" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        make_task(answer_pattern="regex:(")
    assert "not a valid regular expression" in one_line(e)


def test_exact_match_metric_module():
    from frod_cli import metrics

    assert metrics.compute(["exact_match"], ["a", "b", "c", "d"], ["a", "b", "x", "d"]) == {"exact_match": 0.75}
    assert metrics.load_metric("exact_match").compute(predictions=["A "], references=["a"], ignore_case=True) == {"exact_match": 1.0}


# --------------------------------------------------------------------------------------------- encoding
def test_instruction_labels_mask_the_prompt(tmp_path, tiny):
    _, tok = tiny
    row = {"instruction": "What is 2 plus 3?", "input": "", "output": "5"}
    task = local(tmp_path, [row])
    enc = task.encode(task.load_data(), tok)
    assert task.format == "instruction"
    ex = enc["train"][0]
    prompt = instruction_prompt("What is 2 plus 3?")
    assert prompt == "### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n"
    p_ids = [tok.cls_token_id] + ids(tok, prompt)  # the tokenizer's BOS, then the plain layout
    answer = ids(tok, "5") + [tok.eos_token_id]
    assert ex["input_ids"] == p_ids + answer
    assert ex["labels"] == [-100] * len(p_ids) + answer
    assert ex["prompt_len"] == len(p_ids) and ex["prompt"] == prompt and ex["reference"] == "5"

    # with an input column and a system prompt, and loss on the prompt too
    row2 = {"instruction": "Classify the sentiment.", "input": "I loved it", "output": "positive"}
    task = local(tmp_path, [row2], name="b.jsonl", train_on_prompt=True, system_prompt="Be brief.")
    ex = task.encode(task.load_data(), tok)["train"][0]
    prompt = "Be brief.\n\n### Instruction:\nClassify the sentiment.\n\n### Input:\nI loved it\n\n### Response:\n"
    assert ex["prompt"] == prompt
    assert ex["labels"] == [-100] + ex["input_ids"][1:]  # only the BOS is never a target


def test_template_and_text_formats(tmp_path, tiny):
    _, tok = tiny
    rows = [{"question": "Is the sky blue?", "answer": "yes", "id": 1}]
    task = local(tmp_path, rows, prompt_template="Q: {question}\nA:", response_template=" {answer}")
    ex = task.encode(task.load_data(), tok)["train"][0]
    assert task.format == "template" and ex["prompt"] == "Q: Is the sky blue?\nA:" and ex["reference"] == " yes"
    assert ex["labels"][ex["prompt_len"]:] == ids(tok, " yes") + [tok.eos_token_id]

    task = local(tmp_path, [{"text": "A plain document."}], name="t.jsonl")
    data = task.load_data()
    ex = task.encode(data, tok)["train"][0]
    assert task.format == "text" and not ex["has_reference"]
    assert ex["labels"] == [-100] + ids(tok, "A plain document.") + [tok.eos_token_id]


def test_chat_template_renders_and_masks_assistant_turns(tmp_path, tiny, chat_tok):
    tok = chat_tok
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "8"}]
    task = local(tmp_path, [{"messages": msgs}], system_prompt="Answer briefly.")
    ex = task.encode(task.load_data(), tok)["train"][0]
    assert task.format == "chat"
    full = [{"role": "system", "content": "Answer briefly."}] + msgs
    prompt = tok.apply_chat_template(full[:4], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|user|>\nAnd 4 plus 4?\n<|assistant|>\n")
    assert ex["prompt"] == prompt and ex["reference"] == "8"
    assert ex["input_ids"][: ex["prompt_len"]] == ids(tok, prompt)  # generation starts from exactly these
    assert tok.decode(ex["input_ids"]) == tok.decode(ids(tok, tok.apply_chat_template(full, tokenize=False)))
    # loss only on the assistant turns: each answer followed by the template's EOS (not appended twice)
    turn1 = tok.apply_chat_template(full[:2], add_generation_prompt=True, tokenize=False)
    segments = [(turn1, False), ("5[SEP]\n", True), (prompt[len(turn1) + len("5[SEP]\n"):], False), ("8[SEP]\n", True)]
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(full, tokenize=False)
    want_ids = [t for text, _ in segments for t in ids(tok, text)]
    want_labels = [t if train else -100 for text, train in segments for t in ids(tok, text)]
    assert ex["input_ids"] == want_ids and ex["labels"] == want_labels
    assert [t for t in want_labels if t != -100] == ids(tok, "5") + [tok.eos_token_id] + ids(tok, "8") + [tok.eos_token_id]

    # instruction data with a chat template: one user turn (instruction, blank line, input) and one assistant turn
    task = local(tmp_path, [{"instruction": "Classify.", "input": "I loved it", "output": "positive"}], name="i.jsonl")
    ex = task.encode(task.load_data(), tok)["train"][0]
    assert ex["prompt"] == "<|user|>\nClassify.\n\nI loved it\n<|assistant|>\n"

    # chat data without a chat template: refused in one line
    task = local(tmp_path, [{"messages": msgs}], name="c.jsonl")
    with pytest.raises(FrodCliError) as e:
        task.encode(task.load_data(), tiny[1])
    assert "chat template" in one_line(e)


def test_truncation_and_drops_are_counted(tmp_path, tiny, caplog):
    _, tok = tiny
    rows = [{"instruction": "What is 2 plus 3?", "output": "5"},                          # fits
            {"instruction": "Say it.", "output": " ".join(["word"] * 40)},                 # response cut
            {"instruction": " ".join(["long"] * 40), "output": "x"}]                       # prompt fills max_length
    task = local(tmp_path, rows, max_length=24)
    with caplog.at_level(logging.WARNING, logger="frod_cli.tasks.causal_lm"):
        enc = task.encode(task.load_data(), tok)
    assert task.stats["train"] == {"examples": 3, "kept": 2, "whole": 1, "cut": 0, "truncated": 1, "dropped": 1,
                                   "turns_dropped": 0, "malformed": 0}
    assert len(enc["train"]) == 2 and max(len(x) for x in enc["train"]["input_ids"]) == 24
    assert "2 of 3 examples longer than task.max_length=24: 0 cut at a turn boundary, 1 truncated" in caplog.text
    cut = enc["train"][1]
    assert cut["labels"][-1] != tok.eos_token_id and cut["labels"][: cut["prompt_len"]] == [-100] * cut["prompt_len"]


def test_refusals_are_one_line(tmp_path, tiny):
    _, tok = tiny
    with pytest.raises(FrodCliError) as e:  # explicit format, missing column
        local(tmp_path, [{"instruction": "a", "answer": "b"}], data_format="instruction").load_data()
    assert "has no column 'output'" in one_line(e)
    with pytest.raises(FrodCliError) as e:  # auto: nothing recognisable
        local(tmp_path, [{"q": "a", "a": "b"}], name="n.jsonl").load_data()
    assert "matches no format" in one_line(e)
    with pytest.raises(FrodCliError) as e:  # a template naming an unknown field
        local(tmp_path, [{"question": "a", "answer": "b"}], name="q.jsonl",
              prompt_template="Q: {question} ({topic})", response_template=" {answer}").load_data()
    assert "has no template field 'topic'" in one_line(e)
    task = local(tmp_path, [{"instruction": "many words here " * 10, "output": "b"}] * 2, name="l.jsonl", max_length=8)
    with pytest.raises(FrodCliError) as e:  # every example too long
        task.encode(task.load_data(), tok)
    assert "every example of split 'train' is too long" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        make_task(objective="accuracy", objective_mode="max")
    assert "not a causal_lm metric" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        make_task(objective="loss", objective_mode="max")
    assert "objective_mode=min" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        make_task(data_format="markdown")
    assert "unknown task.data_format" in one_line(e)


def test_offline_source_and_splits(tiny):
    task = make_task(source="offline", dataset="sft_tiny", validation_split=None, test_split=None, max_length=64)
    data = task.load_data()
    assert {k: len(v) for k, v in data.items()} == {"train": 256, "validation": 32, "test": 32}
    again = make_task(source="offline", dataset="sft_tiny", validation_split=None, test_split=None).load_data()
    assert data["validation"]["messages"] == again["validation"]["messages"]  # deterministic split
    chat = make_task(source="offline", dataset="sft_tiny_chat", validation_split=None, test_split=None).load_data()
    assert chat["train"][0]["messages"][0]["role"] == "user" and task.format == "instruction"


# ---------------------------------------------------------------------------------------------- packing
def test_packing_blocks_and_boundaries(tmp_path, tiny):
    model, tok = tiny
    rows = [{"instruction": f"What is {i} plus {i + 1}?", "output": str(2 * i + 1)} for i in range(12)]
    task = local(tmp_path, rows, max_length=48, packing=True)
    enc = task.encode(task.load_data(), tok)
    plain = local(tmp_path, rows, name="p.jsonl", max_length=48).encode(task.load_data(), tok)["train"]
    blocks = enc["train"]
    assert set(blocks.column_names) == {"input_ids", "labels", "position_ids"}
    assert "prompt" in enc["validation"].column_names  # only train is packed
    assert all(len(b) <= 48 for b in blocks["input_ids"]) and len(blocks) < len(plain)
    assert sum(map(len, blocks["input_ids"])) == sum(map(len, plain["input_ids"]))  # no example split or lost
    first = blocks[0]
    starts = [i for i, p in enumerate(first["position_ids"]) if p == 0]
    assert len(starts) >= 2 and all(first["labels"][s] == -100 for s in starts)

    batch = task.collate(tok)([blocks[0], blocks[len(blocks) - 1]])
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[1] == len(first["input_ids"])
    with torch.no_grad():
        packed = model(**task.model_inputs(model, batch)).logits[0]
        bounds = starts + [len(first["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):  # each example alone gives the same logits: no cross-attention
            alone = model(input_ids=batch["input_ids"][:1, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-4)
        crossing = model(input_ids=batch["input_ids"][:1], attention_mask=torch.ones_like(batch["input_ids"][:1]),
                         position_ids=batch["position_ids"][:1]).logits[0]
        assert not torch.allclose(crossing[starts[1]:bounds[2]], packed[starts[1]:bounds[2]], atol=1e-5)
        assert torch.isfinite(task.loss(model, batch))


def test_collate_right_pads():
    task = make_task()
    tok = type("T", (), {"pad_token_id": 0, "eos_token_id": 2, "unk_token_id": 1})()
    batch = task.collate(tok)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------------------------- generation, eval
def test_left_padded_batches_generate_like_single_prompts(tiny):
    model, tok = tiny
    prompts = [encode_prompt(tok, instruction_prompt(q)) for q in
               ("What is 2 plus 3?", "Is 7 even or odd? Answer with one word.", "Hi", "What is the capital of France?")]
    assert len({len(p) for p in prompts}) > 1
    batched = generate_ids(model, tok, prompts, batch_size=4, max_new_tokens=6)
    single = [generate_ids(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(len(x) > 0 for x in batched)
    texts = generate_texts(model, tok, [instruction_prompt("Hi")], batch_size=2, max_new_tokens=6)
    assert texts == [tok.decode(single[2], skip_special_tokens=True).strip()]


def test_evaluate_loss_perplexity_exact_match_records(tmp_path, tiny):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    model, tok = tiny
    rows = [{"instruction": f"Is {n} even or odd? Answer with one word.", "output": "even" if n % 2 == 0 else "odd"}
            for n in range(1, 11)]
    task = local(tmp_path, rows, labels=["even", "odd"], answer_pattern="first_word",
                 generation={"max_examples": 6, "batch_size": 4, "max_new_tokens": 4})
    enc = task.encode(task.load_data(), tok)
    collate = task.collate(tok)
    acc = Accelerator(cpu=True)
    loader = acc.prepare(DataLoader(enc["validation"], batch_size=4, shuffle=False, collate_fn=collate))
    metrics, records = task.evaluate(model, enc["validation"], loader, acc)
    assert set(metrics) == {"loss", "perplexity", "token_accuracy", "exact_match", "accuracy"}
    with torch.no_grad():  # one batch holding the whole split: HF's loss is the same token-weighted mean
        whole = task.loss(model, collate([enc["validation"][i] for i in range(len(enc["validation"]))]))
    assert metrics["loss"] == pytest.approx(float(whole), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert [r["index"] for r in records] == list(range(6))
    assert set(records[0]) >= {"prompt", "prediction", "extracted", "reference", "correct"}
    assert records[0]["reference"] == "odd" and records[0]["prompt"].startswith("### Instruction:\nIs 1 even")
    assert metrics["exact_match"] == sum(r["correct"] for r in records) / 6
    again, records2 = task.evaluate(model, enc["validation"], loader, acc)
    assert again == metrics and records2 == records  # deterministic examples and greedy answers

    # scoring itself, on hand-made records
    recs = [{"extracted": "even", "reference_answer": "even"}, {"extracted": "Odd.", "reference_answer": "odd"},
            {"extracted": "maybe", "reference_answer": "odd"}, {"extracted": None, "reference_answer": "even"}]
    assert task.score(recs) == {"exact_match": 0.5, "accuracy": 0.5}

    # text data: no references, so loss and perplexity only
    text_task = local(tmp_path, [{"text": f"document number {i}"} for i in range(4)], name="t.jsonl")
    tenc = text_task.encode(text_task.load_data(), tok)
    tloader = acc.prepare(DataLoader(tenc["validation"], batch_size=2, shuffle=False, collate_fn=text_task.collate(tok)))
    m, r = text_task.evaluate(model, tenc["validation"], tloader, acc)
    assert r is None and set(m) == {"loss", "perplexity", "token_accuracy"}


# --------------------------------------------------------------------------------------- frod generate
def gen_cfg(**kw):
    return OmegaConf.structured(GenerateRunConfig(**kw))


def test_run_generate_from_a_saved_model_and_a_run_dir(tmp_path, tiny, capsys):
    model, tok = tiny
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    want = generate_texts(model, tok, ["What is 2 plus 3?"], max_new_tokens=5)[0]
    records = run_generate(gen_cfg(path=str(saved), prompt="What is 2 plus 3?", max_new_tokens=5, cpu=True))
    assert records == [{"prompt": "What is 2 plus 3?", "answer": want}]
    out = capsys.readouterr().out
    assert ">>> What is 2 plus 3?" in out and want in out

    # a run directory: merged/ is used, and prompts get the instruction layout the run trained with
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "model: {name_or_path: 'tiny:llama'}\nmethod: {name: frod}\n"
        "task: {type: causal_lm, name: sft_tiny, objective: loss, objective_mode: min}\n")
    model.save_pretrained(run / "merged")
    tok.save_pretrained(run / "merged")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n\n{"prompt": "What is 2 plus 3?"}\n')
    records = run_generate(gen_cfg(path=str(run), prompts=str(prompts), max_new_tokens=5, output=str(tmp_path / "o.jsonl")))
    laid_out = generate_texts(model, tok, [instruction_prompt("Hi"), instruction_prompt("What is 2 plus 3?")], max_new_tokens=5)
    assert [r["answer"] for r in records] == laid_out
    assert [json.loads(x)["prompt"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["Hi", "What is 2 plus 3?"]


def test_run_generate_refuses_bad_input(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        (gen_cfg(path=str(empty_dir), prompt="hi"), "no model in"),
        (gen_cfg(path=str(tmp_path / "nowhere"), prompt="hi"), "no such run directory or model"),
        (gen_cfg(path=str(empty_dir)), "nothing to generate from"),
        (gen_cfg(path=str(empty_dir), prompt="   "), "prompt is empty"),
    ]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    cases.append((gen_cfg(path=str(empty_dir), prompts=str(blank)), "holds no prompts"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi"}\n')
    cases.append((gen_cfg(path=str(empty_dir), prompts=str(bad)), 'line 1 has no "prompt"'))
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {name_or_path: 'tiny:bert'}\nmethod: {name: frod}\n"
                                                "task: {type: seq_cls, name: x}\n")
    cases.append((gen_cfg(path=str(run), prompt="hi"), "frod generate needs a causal LM run"))
    for cfg, msg in cases:
        with pytest.raises(FrodCliError) as e:
            run_generate(cfg)
        assert msg in one_line(e)
