"""The one reader of conversation layouts (frod_cli/tasks/layouts.py) through causal_lm: ShareGPT, prompt/completion,
instruction and chat give the same labels for the same conversation; malformed rows are refused in one line (first
row, count) or dropped with counts; task.chat_template; the tokenization cache; one end-to-end run of every layout
(a mixture, with ChatML given to a base that has no template; merged/ keeps it).

Real small things: the tiny random LLaMA of frod_cli.models (tiny:llama, no template; tiny:llama-chat, ChatML) and
the packaged layout files (frod_cli/tasks/data/, scripts/make_layout_files.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.cli import run_verb
from frod_cli.config import ModelConfig
from frod_cli.tasks import task_config
from frod_cli.models import load_model
from frod_cli.tasks import get_task, layouts, lm_data, tool_calls

DATA = Path(__file__).resolve().parents[1] / "frod_cli" / "tasks" / "data"
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def make_task(**over):
    base = {"type": "causal_lm", "name": "t", "objective": "loss", "objective_mode": "min", "max_length": 96}
    return get_task("causal_lm")(task_config(base["type"], **{**base, **over}), 0)


def local(tmp_path, rows, name="d.jsonl", **over):
    """A task over a local JSONL file used as both train and validation."""
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return make_task(source="local", data_files={"train": str(path), "validation": str(path)}, test_split=None,
                     test_fraction=0.0, **over)


def encoded(task, tok, split="train"):
    return task.encode(task.load_data(), tok)[split]


def packaged(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def chat_tok():
    """tiny:llama-chat's tokenizer: MiniLM's vocabulary + ChatML markers, <|im_end|> the EOS."""
    return load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama-chat")), make_task())[1]


@pytest.fixture(scope="module")
def plain_tok():
    return load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), make_task())[1]


# ------------------------------------------------------------------------------------------ same tokens
def test_sharegpt_and_messages_give_identical_labels(tmp_path, chat_tok):
    share = packaged("sft_tiny_sharegpt.jsonl")  # 64 conversations, every 8th with a system turn
    chat = [{"messages": [{"role": ROLE[t["from"]], "content": t["value"]} for t in r["conversations"]]} for r in share]
    a = encoded(local(tmp_path, share, "s.jsonl", data_format="sharegpt"), chat_tok)
    b = encoded(local(tmp_path, chat, "c.jsonl", data_format="chat"), chat_tok)
    assert len(a) == len(b) == 64
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and a["prompt_len"] == b["prompt_len"]
    # the trained tokens are each assistant answer + the template's end of turn, nothing else
    first = chat[3]["messages"]  # two exchanges
    trained = [t for t in a[3]["labels"] if t != -100]
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    want = []
    for m in first:
        if m["role"] == "assistant":
            want += chat_tok(m["content"], add_special_tokens=False)["input_ids"] + [im_end]
    assert trained == want


def test_prompt_completion_trains_only_the_completion(tmp_path, chat_tok):
    chat = packaged("sft_tiny_chat.jsonl")[:8]  # rows 3 and 7 have two exchanges
    pc = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in chat]
    a = encoded(local(tmp_path, pc, "p.jsonl"), chat_tok)  # auto: prompt_completion
    b = encoded(local(tmp_path, chat, "c.jsonl"), chat_tok)
    assert a["input_ids"] == b["input_ids"]
    for i, r in enumerate(chat):
        if len(r["messages"]) == 2:
            assert a[i]["labels"] == b[i]["labels"]
        else:  # the prompt's earlier answer is context: only the last answer is trained (TRL's rule)
            last = b[i]["labels"][b[i]["prompt_len"]:]
            assert a[i]["labels"] == [-100] * b[i]["prompt_len"] + last
            assert sum(t != -100 for t in b[i]["labels"]) > sum(t != -100 for t in a[i]["labels"])


def test_string_prompt_completion_is_raw_like_a_template(tmp_path, chat_tok):
    rows = packaged("sft_tiny_completions.jsonl")[:6]
    a = encoded(local(tmp_path, rows, "p.jsonl"), chat_tok)  # strings: never through the chat template
    b = encoded(local(tmp_path, rows, "t.jsonl", prompt_template="{prompt}", response_template="{completion}"), chat_tok)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert a[0]["prompt"] == rows[0]["prompt"] and a[0]["reference"] == rows[0]["completion"]
    assert "<|im_start|>" not in chat_tok.decode(a[0]["input_ids"])


def test_instruction_with_a_template_is_one_user_and_one_assistant_turn(tmp_path, chat_tok):
    rows = [{"instruction": "Classify.", "input": "I loved it", "output": "positive"},
            {"instruction": "What is 2 plus 3?", "input": "", "output": "5"}]
    chat = [{"messages": [{"role": "user", "content": "Classify.\n\nI loved it"}, {"role": "assistant", "content": "positive"}]},
            {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]}]
    a = encoded(local(tmp_path, rows, "i.jsonl", system_prompt="Be brief."), chat_tok)
    b = encoded(local(tmp_path, chat, "c.jsonl", system_prompt="Be brief."), chat_tok)
    assert a["labels"] == b["labels"] and a["input_ids"] == b["input_ids"]
    assert a[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_role_map_and_openai_text_parts(tmp_path, chat_tok):
    rows = [{"conversations": [{"from": "bot_user", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}]
    a = encoded(local(tmp_path, rows, "r.jsonl", role_map={"bot_user": "user", "bot": "assistant"}), chat_tok)
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
                           {"role": "assistant", "content": "Hello"}]}]
    b = encoded(local(tmp_path, parts, "o.jsonl"), chat_tok)
    assert a["labels"] == b["labels"]
    with pytest.raises(FrodCliError) as e:
        make_task(role_map={"bot": "robot"})
    assert "roles are system, user, assistant" in one_line(e)


# ------------------------------------------------------------------------------------------ malformed rows
GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
BAD_CHAT = [
    ("no_messages", {"text": "x"}, "'messages' is missing"),
    ("turn_without_content", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     "turn 2 (assistant) 'content' is missing"),
    ("no_assistant_turn", {"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ("not_a_list", {"messages": "hello"}, "not a list of turns"),
]


@pytest.mark.parametrize("case, row, reason", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_malformed_chat_rows_are_refused_naming_the_first(case, row, reason, tmp_path, chat_tok):
    rows = [GOOD, GOOD, row, GOOD, row]
    task = local(tmp_path, rows, data_format="chat")
    with pytest.raises(FrodCliError) as e:
        encoded(task, chat_tok)
    msg = one_line(e)
    assert "split 'train': 2 of 5 rows cannot be read; the first, row 3:" in msg and reason in msg, msg
    assert "task.skip_malformed=true" in msg


def test_skip_malformed_drops_and_counts(tmp_path, chat_tok, caplog):
    rows = [GOOD, {"text": "x"}, GOOD, {"messages": [{"role": "user"}]}]
    task = local(tmp_path, rows, data_format="chat", skip_malformed=True)
    enc = task.encode(task.load_data(), chat_tok)
    assert len(enc["train"]) == 2
    assert task.data_stats()["sources"]["d"]["read"]["train"] == {"rows": 4, "malformed": 2, "converted": 0}
    assert "dropped 2 of 4 rows that cannot be read" in caplog.text


def test_sharegpt_refusals(tmp_path, chat_tok):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bing = {"conversations": [{"from": "human", "value": "a"}, {"from": "bing", "value": "b"}]}
    with pytest.raises(FrodCliError) as e:
        encoded(local(tmp_path, [good, bing], "b.jsonl"), chat_tok)
    assert "row 2: 'conversations' turn 2: role 'bing' is not in task.role_map" in one_line(e)
    novalue = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}
    with pytest.raises(FrodCliError) as e:
        encoded(local(tmp_path, [novalue, good], "v.jsonl"), chat_tok)
    assert "1 of 2 rows cannot be read; the first, row 1: 'conversations' turn 2 (gpt) 'value' is missing" in one_line(e)


def test_a_role_the_template_cannot_render(tmp_path):
    tok = copy.deepcopy(load_model(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")), make_task())[1])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tool = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "t"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(FrodCliError) as e:
        encoded(local(tmp_path, [GOOD, tool]), tok)
    assert "row 2: the chat template cannot render it: unknown role tool" in one_line(e)


def test_instruction_and_text_rows_missing_a_field(tmp_path, plain_tok):
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": None, "output": "c"}]).load_data()
    assert "row 2: 'instruction' is missing" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, [{"text": "a"}, {"text": None}, {"text": None}], "t.jsonl").load_data()
    assert "2 of 3 rows cannot be read; the first, row 2: 'text' is missing" in one_line(e)


def test_formats_auto_and_refusals(tmp_path):
    cfg = make_task().cfg
    assert layouts.resolve_format(["conversations", "id"], cfg) == "sharegpt"
    assert layouts.resolve_format(["prompt", "completion"], cfg) == "prompt_completion"
    assert layouts.resolve_format(["messages", "prompt"], cfg) == "chat"
    with pytest.raises(FrodCliError) as e:
        layouts.resolve_format(["q", "a"], cfg)
    assert "its columns are ['a', 'q']" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, [{"prompt": "a", "completion": ["b"]}]).load_data()
    assert "must both be strings or both lists of turns" in one_line(e)
    with pytest.raises(FrodCliError) as e:
        make_task(chat_template="my_template")
    assert "neither a built-in (chatml) nor a Jinja template" in one_line(e)


def test_chat_data_without_a_template_names_the_setting(tmp_path, plain_tok):
    task = local(tmp_path, [GOOD])
    with pytest.raises(FrodCliError) as e:
        encoded(task, plain_tok)
    assert "task.chat_template=chatml" in one_line(e)


def test_chat_template_setting_installs_and_resizes_the_same_way_each_load():
    task = make_task(chat_template="chatml")
    spec = OmegaConf.structured(ModelConfig(name_or_path="tiny:llama"))
    (m1, t1), (m2, _) = load_model(spec, task), load_model(spec, task)
    base = load_model(spec, make_task())[0]
    assert len(t1) == m1.get_input_embeddings().weight.shape[0] == base.get_input_embeddings().weight.shape[0] + 2
    assert t1.eos_token == "<|im_end|>" and m1.config.eos_token_id == t1.eos_token_id
    assert (m1.get_input_embeddings().weight == m2.get_input_embeddings().weight).all()  # an adapter reloads onto it
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    _, t3 = load_model(spec, make_task(chat_template=jinja))
    assert t3.chat_template == jinja and len(t3) == base.get_input_embeddings().weight.shape[0]


# ------------------------------------------------------------------------------------------ cache
def test_tokenization_is_cached_for_the_next_run(tmp_path, chat_tok, monkeypatch):
    path = tmp_path / "share.jsonl"
    path.write_text((DATA / "sft_tiny_sharegpt.jsonl").read_text())

    def task(**over):  # a new task each time, on the same file, as the next run would build it
        return make_task(source="local", data_files={"train": str(path)}, validation_fraction=0.25, **over)

    calls = {"n": 0}
    real = lm_data.Encoder.__call__

    def counting(self, row):
        calls["n"] += 1
        return real(self, row)

    monkeypatch.setattr(lm_data.Encoder, "__call__", counting)
    first = encoded(task(), chat_tok)
    assert calls["n"] == 64  # train, validation and test carved out of the file's 64 rows
    calls["n"] = 0
    again = encoded(task(), chat_tok)  # the same data and settings: datasets' cache, nothing tokenized
    assert calls["n"] == 0 and again["labels"] == first["labels"] and again.cache_files
    encoded(task(max_length=24), chat_tok)  # another setting: tokenized again
    assert calls["n"] == 64
    calls["n"] = 0
    encoded(task(), copy.deepcopy(chat_tok))  # an equal tokenizer object: still cached
    assert calls["n"] == 0


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_every_layout_trains_in_one_mixture_with_chatml_on_a_base_without_a_template(tmp_path):
    """instruction, sharegpt, chat, prompt_completion (strings) and text in one run on tiny:llama (no template of
    its own) with task.chat_template=chatml: per-source metrics and counts, and merged/ carries the template and
    the new embedding rows. (The issue's command, sharegpt + chatml on sft_smoke, runs in tests/test_readme.py.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = tmp_path / "chat.jsonl"
    chat.write_text((DATA / "sft_tiny_chat.jsonl").read_text())
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": f"note {i}: the sky is blue."}) + "\n" for i in range(40)))
    mixture = ("[{name: instr, source: offline, dataset: sft_tiny, weight: 3}, "
               "{name: share, source: offline, dataset: sft_tiny_sharegpt}, "
               f"{{data_files: {{train: {chat}}}}}, "
               "{name: pc, source: offline, dataset: sft_tiny_completions}, "
               f"{{name: notes, data_files: {{train: {text}}}, data_format: text, validation_fraction: 0.2}}]")
    run = tmp_path / "run"
    code, _ = run_verb("train", ["recipe=sft_smoke", f"task.mixture={mixture}", "task.chat_template=chatml",
                                 "task.max_length=96", "train.max_steps=2", "train.eval_every=2", "train.progress=false",
                                 "task.generation.max_examples=4", "task.generation.max_new_tokens=2",
                                 f"hydra.run.dir={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    sources = m["data_counts"]["sources"]
    assert {k: v["format"] for k, v in sources.items()} == {
        "instr": "instruction", "share": "sharegpt", "chat": "chat", "pc": "prompt_completion", "notes": "text"}
    assert sum(v["train_examples"] for v in sources.values()) == m["data_counts"]["splits"]["train"]["kept"]
    assert all(v["train_examples"] > 0 for v in sources.values())
    for name in sources:
        assert f"{name}/loss" in m["validation"], name
    assert "share/exact_match" in m["validation"] and "notes/exact_match" not in m["validation"]
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert {r["source"] for r in records} == set(sources) - {"notes"}
    assert all(r["prompt"].startswith("<|im_start|>") for r in records if r["source"] in ("instr", "share", "chat"))
    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 30524


# ------------------------------------------------------------------------------------------ tool calling
def test_tool_calls_in_messages_and_in_sharegpt_give_the_same_labels(tmp_path, chat_tok):
    """The packaged function-calling conversations (frod_cli/tasks/data/tools_tiny_{chat,sharegpt}.jsonl): OpenAI's
    tool_calls / tool turns and ShareGPT's function_call / observation give the same tokens and labels; the loss
    covers the assistant's calls and answers, never the tool outputs."""
    a = encoded(local(tmp_path, packaged("tools_tiny_chat.jsonl"), "c.jsonl", max_length=512), chat_tok)
    b = encoded(local(tmp_path, packaged("tools_tiny_sharegpt.jsonl"), "s.jsonl", max_length=512), chat_tok)
    assert len(a) == len(b) == 32
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and a["reference"] == b["reference"]
    row = packaged("tools_tiny_chat.jsonl")[6]["messages"]  # two calls at once, two tool turns, the answer
    assert [m["role"] for m in row] == ["user", "assistant", "tool", "tool", "assistant"]
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    calls = [{"type": "function", "function": {"name": c["function"]["name"],
                                               "arguments": json.loads(c["function"]["arguments"])}}
             for c in row[1]["tool_calls"]]
    call_text = "\n".join(tool_calls.call_text(c) for c in calls)
    want = [t for text in (call_text, row[4]["content"]) for t in chat_tok(text, add_special_tokens=False)["input_ids"] + [im_end]]
    assert [t for t in a[6]["labels"] if t != -100] == want
    assert a[6]["prompt"].count("<|im_start|>tool\n") == 2
    assert '"arguments": {"a": 3, "b": 6.3}' in call_text  # numbers stay numbers
    assert a[6]["reference"] == row[4]["content"]


TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]


def test_a_tools_column_reaches_the_template_in_both_forms(tmp_path, chat_tok):
    """tools as a list (messages) or a JSON string of bare schemas (LLaMA-Factory's ShareGPT form): the same
    rendering, the schemas in the system turn; arguments given as an object or as a JSON string alike."""
    chat = {"messages": [{"role": "user", "content": "2 plus 3?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                         {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}], "tools": TOOLS}
    share = {"conversations": [{"from": "human", "value": "2 plus 3?"},
                               {"from": "function_call", "value": '{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}'},
                               {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5"}],
             "tools": json.dumps([t["function"] for t in TOOLS])}
    a = encoded(local(tmp_path, [chat], "c.jsonl", max_length=512), chat_tok)
    b = encoded(local(tmp_path, [share], "s.jsonl", max_length=512), chat_tok)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    text = a[0]["prompt"]  # everything before the last answer
    assert text.index("<tools>") < text.index('"add"') < text.index("</tools>") < text.index("2 plus 3")
    schema_tokens = chat_tok("a + b", add_special_tokens=False)["input_ids"]
    trained = [t for t in a[0]["labels"] if t != -100]
    assert not any(trained[i:i + len(schema_tokens)] == schema_tokens for i in range(len(trained)))


BAD_TOOLS = [
    ("bad_json_arguments", {"from": "function_call", "value": '{"name": "add", "arguments": "{a: 2}"}'},
     "'conversations' turn 2 (function_call) 'value' (add) arguments is not valid JSON"),
    ("arguments_not_an_object", {"from": "function_call", "value": '{"name": "add", "arguments": [2, 3]}'},
     "arguments are a list, not a JSON object"),
    ("call_without_a_name", {"from": "function_call", "value": '{"arguments": {}}'}, "has no function name"),
    ("unknown_role", {"from": "robot", "value": "hi"}, "role 'robot' is not in task.role_map"),
]


@pytest.mark.parametrize("case, turn, reason", BAD_TOOLS, ids=[c[0] for c in BAD_TOOLS])
def test_bad_tool_calls_are_refused_naming_the_row(case, turn, reason, tmp_path):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bad = {"conversations": [{"from": "human", "value": "a"}, turn, {"from": "gpt", "value": "b"}]}
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, [good, bad], data_format="sharegpt").load_data()
    msg = one_line(e)
    assert "1 of 2 rows cannot be read; the first, row 2:" in msg and reason in msg, msg


def test_a_tools_column_is_read_or_refused(tmp_path, chat_tok):
    row = {"messages": GOOD["messages"], "tools": {"name": "add"}}
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, [row]).load_data()
    assert "row 1: 'tools' is a dict, not a list of tool schemas" in one_line(e)
    rows = [{"instruction": "a", "output": "b", "tools": "[]"}]
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, rows, "i.jsonl").load_data()
    assert "has a tools column 'tools', which the instruction layout does not read" in one_line(e)
    assert "task.tools_field=null" in str(e.value)
    assert len(local(tmp_path, rows, "i.jsonl", tools_field=None).load_data()["train"]) == 1
    tool_turn = {"messages": GOOD["messages"][:1] + [{"role": "tool", "content": "x", "tool_calls": [
        {"function": {"name": "add", "arguments": {}}}]}] + GOOD["messages"][1:]}
    with pytest.raises(FrodCliError) as e:
        local(tmp_path, [tool_turn], "t.jsonl").load_data()
    assert "has tool calls; only an assistant turn calls a tool" in one_line(e)


def test_a_template_that_ignores_tool_calls_is_refused(tmp_path, chat_tok):
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    rows = packaged("tools_tiny_chat.jsonl")[:2]
    with pytest.raises(FrodCliError) as e:
        encoded(local(tmp_path, rows), tok)
    assert "the chat template does not render the tool calls of turn 2 ('add' is not in its rendering)" in one_line(e)


def test_role_map_targets_tool_roles_and_is_set_as_printed(tmp_path, chat_tok):
    """task.role_map={bot: assistant} as the README prints it (no '+'), composed by Hydra; custom names for the
    call and the result map to function_call and tool."""
    from conftest import compose_train

    cfg = compose_train(["recipe=sft_smoke", "task.role_map={bot: assistant, call: function_call, result: tool}"])
    assert dict(cfg.task.role_map) == {"bot": "assistant", "call": "function_call", "result": "tool"}
    share = packaged("tools_tiny_sharegpt.jsonl")[:4]
    names = {"human": "human", "gpt": "bot", "function_call": "call", "observation": "result", "system": "system"}
    custom = [{"conversations": [{"from": names[t["from"]], "value": t["value"]} for t in r["conversations"]]}
              for r in share]
    a = encoded(local(tmp_path, share, "s.jsonl", max_length=512), chat_tok)
    b = encoded(local(tmp_path, custom, "c.jsonl", max_length=512, role_map=dict(cfg.task.role_map)), chat_tok)
    assert a["labels"] == b["labels"]


# ------------------------------------------------------------------------------------------ long conversations
def test_a_long_conversation_keeps_its_early_turns(tmp_path, chat_tok, caplog):
    """tools_tiny row 2 has three exchanges (call, result, answer each). At a max_length where only the first
    exchange fits, the row is cut after its first answer (loss on its call and answer); the prompt and reference
    are those of that answer; counted. Shorter: truncated inside its first trained turn; shorter still: dropped."""
    row = packaged("tools_tiny_chat.jsonl")[2]
    full = encoded(local(tmp_path, [row], "f.jsonl", max_length=512), chat_tok)[0]
    msgs = row["messages"]
    first_answer = msgs[3]["content"]
    conv = layouts.read(row, "chat", make_task().cfg)
    pieces = layouts.token_segments(layouts.conversation_segments(conv, chat_tok, None), chat_tok, with_template=True)
    lengths = [len(ids) for ids, _ in pieces]
    answer = [i for i, (_, trained) in enumerate(pieces) if trained][1]  # trained: call 1, answer 1, call 2, ...
    limit = sum(lengths[: answer + 1]) + 3  # the first exchange and a few tokens of the next
    with caplog.at_level("WARNING", logger="frod_cli.tasks.causal_lm"):
        task = local(tmp_path, [row], "l.jsonl", max_length=limit)
        cut = encoded(task, chat_tok)[0]
    assert task.stats["train"] == {"examples": 1, "kept": 1, "whole": 0, "cut": 1, "truncated": 0, "dropped": 0,
                                   "turns_dropped": 4, "malformed": 0}
    assert "1 cut at a turn boundary" in caplog.text
    n = len(cut["input_ids"])
    assert n <= limit and cut["input_ids"] == full["input_ids"][:n] and cut["labels"] == full["labels"][:n]
    assert cut["input_ids"][-1] == chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert n == sum(lengths[: answer + 1]) and cut["reference"] == first_answer  # ends with the first answer
    assert cut["prompt"].endswith("<|im_start|>tool\n" + msgs[2]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    task = local(tmp_path, [row], "t.jsonl", max_length=20)
    short = encoded(task, chat_tok)[0]
    assert task.stats["train"]["truncated"] == 1 and len(short["input_ids"]) == 20
    assert short["reference"].startswith("<tool_call>") and sum(t != -100 for t in short["labels"]) == 20 - short["prompt_len"]
    task = local(tmp_path, [row, packaged("tools_tiny_chat.jsonl")[0]], "d.jsonl", max_length=8)
    with pytest.raises(FrodCliError) as e:
        encoded(task, chat_tok)
    assert "the text before its first trained turn fills task.max_length=8" in one_line(e)


# ------------------------------------------------------------------------------------------ numbers as text
def test_number_and_boolean_cells_are_text_in_every_layout(tmp_path, plain_tok, caplog):
    """A CSV of numbers (prompt/completion, instruction) and JSON numbers in turns: written out, counted."""
    csv = tmp_path / "n.csv"
    csv.write_text("prompt,completion\n" + "".join(f"{i} squared is,{i * i}\n" for i in range(2, 12)))
    task = make_task(source="local", data_files={"train": str(csv)}, validation_fraction=0.2, test_fraction=0.0)
    with caplog.at_level("INFO", logger="frod_cli.tasks.causal_lm"):
        data = task.load_data()
    assert task.read_stats["n"]["train"] == {"rows": 10, "malformed": 0, "converted": 10}
    assert "split 'train': 10 number or boolean cells written out as text" in caplog.text
    assert sorted(list(data["train"]["reference"]) + list(data["validation"]["reference"])) == sorted(str(i * i) for i in range(2, 12))
    rows = [{"instruction": 7, "input": True, "output": 3.5}]
    conv = layouts.read(rows[0], "instruction", make_task().cfg)
    assert conv.converted == 3 and conv.messages[-1]["content"] == "3.5" and "True" in conv.plain_prompt
    share = {"conversations": [{"from": "human", "value": 12}, {"from": "gpt", "value": False}]}
    conv = layouts.read(share, "sharegpt", make_task().cfg)
    assert conv.converted == 2 and [m["content"] for m in conv.messages] == ["12", "False"]
    conv = layouts.read({"q": 4, "a": 16}, "template", make_task(prompt_template="{q}?", response_template="{a}").cfg)
    assert conv.converted == 2 and conv.messages[-1]["content"] == "16"
