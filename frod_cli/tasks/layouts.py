"""The one reader of conversation layouts: a data row becomes a conversation, and a conversation becomes text
segments, each flagged with whether the loss covers it. Every task that reads conversations (causal_lm,
preference) goes through here; tasks never parse rows themselves.

Layouts (`task.data_format`; `auto` picks one from the columns, `resolve_format`):
  instruction        task.instruction_field, optional task.input_field, task.output_field (Alpaca). With a chat
                     template: one user turn (instruction, a blank line, input) and one assistant turn; without
                     one, the plain layout `[system\\n\\n]### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n`.
  chat               task.messages_field: OpenAI-style turns {role, content}; content may be a string or a list
                     of {type: text, text} parts; an assistant turn may call tools (`tool_calls`, or OpenAI's
                     older single `function_call`; content then may be null), a `tool` turn gives a result.
  sharegpt           task.conversations_field: turns {from, value}; `from` goes through task.role_map (default
                     human->user, gpt->assistant, system->system, observation->tool, function_call->function_call:
                     an assistant turn whose value is its call, or a JSON list of calls, as LLaMA-Factory writes
                     them; user/assistant/tool map to themselves). Targets: system, user, assistant, tool,
                     function_call.
  prompt_completion  TRL's task.prompt_field / task.completion_field: two strings (concatenated as they are,
                     never through a chat template, as TRL does) or two message lists (the prompt's turns are
                     context; the completion's assistant turns are trained).
  text, template     (causal_lm only) one plain document trained whole; or task.prompt_template /
                     task.response_template format strings over any columns. Both raw, like string prompt/completion.
task.system_prompt becomes a system turn when a conversation has none (a first paragraph in plain layouts).
Number and boolean cells are written out as text in every layout (`Cells`; counted, and the tasks log the count).

Tool calling (frod_cli/tasks/tool_calls.py has the forms read): a turn's calls and a row's tool schemas
(task.tools_field, `tools`: read by chat, sharegpt and prompt_completion with turns, passed to the template as
`apply_chat_template(messages, tools=...)` does) are stored as JSON strings in every turn's fixed keys
MESSAGE_KEYS and decoded before rendering. The loss covers the assistant's turns, their calls included, never a
tool's output. A tools column that the layout does not read is refused (task.tools_field=null trains without
it); so is a call with arguments that are not a JSON object, a call on a turn that is not the assistant's, and
a template that leaves a call or a tool out of its rendering.

A row that cannot be read raises `MalformedRow` naming the field and the reason; `read_rows` counts them per
split and refuses the split in one line naming the first (row numbers count from 1) and how many, or drops
them with a count when task.skip_malformed=true.

`segments(...)` renders a conversation with the tokenizer's chat template: for each trained turn, the text
before it (with the generation prompt for an assistant turn) and the turn itself, so the pieces concatenate to
exactly the template's rendering of the conversation up to its last trained turn (later turns are dropped),
the trained turn's end-of-turn markup included. A template that cannot render a row (roles that do not
alternate, an unknown role) makes that row malformed. Plain and raw renderings carry no special tokens:
`token_segments` puts the tokenizer's leading specials (BOS) before them and an EOS after the last segment
unless the rendering already ends with it.

Fitting max_length: a conversation whose answers follow a prompt (preference pairs; a prompt-only RL task)
shortens its prompt by `fit_prompt`, the one rule for prompts: oldest whole turns first (a system turn kept),
then the answer is cut. causal_lm's own rule for long multi-turn conversations (keep every whole trained turn
that fits) is in frod_cli/tasks/lm_data.py.

`task.chat_template` (`apply_chat_template_setting`): null keeps the tokenizer's own, `chatml` (or another
built-in of frod_cli.chat_templates; chatml renders tools, calls and tool turns) installs it with its special
tokens, anything else is a Jinja string.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from frod_cli import FrodCliError
from frod_cli.config import TaskConfig, open_map
from frod_cli.decoding import has_chat_template

from . import templates, tool_calls

log = logging.getLogger(__name__)

Message = Dict[str, str]  # a stored turn: MESSAGE_KEYS, all strings (tool_calls as JSON, "" for none)
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id")
LAYOUTS = ("instruction", "chat", "sharegpt", "prompt_completion")  # the conversational layouts
FORMATS = ("auto", *LAYOUTS, "text", "template")
TOOL_LAYOUTS = ("chat", "sharegpt", "prompt_completion")  # the layouts that read task.tools_field
# function_call is not a chat role: a ShareGPT turn whose value is a tool call (or a list of them), read as an
# assistant turn with tool_calls
ROLES = ("system", "user", "assistant", "tool", "function_call")
DEFAULT_ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "function_call",
                    "observation": "tool"}


@dataclass
class ConversationConfig(TaskConfig):
    """The keys of every task type that reads conversations through this module (causal_lm, preference): which
    layout, its columns, the role map, the tools column, the chat template, the system prompt."""

    # auto | instruction | chat | sharegpt | prompt_completion | text | template (the module docstring says each)
    data_format: str = "auto"
    instruction_field: str = "instruction"
    input_field: Optional[str] = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    conversations_field: str = "conversations"  # sharegpt: a list of {from, value} turns
    # sharegpt `from` -> role (system, user, assistant, tool, or function_call: an assistant turn whose value is a
    # tool call), over the defaults human->user, gpt->assistant, system->system, function_call->function_call,
    # observation->tool (user, assistant, tool kept)
    role_map: Dict[str, str] = field(default_factory=open_map)
    # chat / sharegpt / prompt_completion (lists of turns): a column of tool schemas (a list, or its JSON string)
    # passed to the chat template as apply_chat_template(tools=...) does; null: no tools column is read
    tools_field: Optional[str] = "tools"
    prompt_field: str = "prompt"  # prompt_completion (TRL's prompt column: a string or a list of turns)
    completion_field: str = "completion"  # prompt_completion: with prompt_field (TRL's prompt/completion)
    text_fields: List[str] = field(default_factory=lambda: ["text"])  # text: the one column of documents
    # template: python format strings over the columns, e.g. "Question: {question}\nAnswer:", " {answer}"
    prompt_template: Optional[str] = None
    response_template: Optional[str] = None
    # null: the tokenizer's own; chatml (a built-in, its tokens added, saved with merged/) or a Jinja string
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None  # a first system turn when a conversation has none
    skip_malformed: bool = False  # drop rows that cannot be read (counted) instead of refusing the split


class MalformedRow(ValueError):
    """One row cannot be read (missing column, turn without content, role not in the map, wrong type)."""


@dataclass
class Conversation:
    """What a row says, before any tokenizer: its turns and how it may be rendered."""

    messages: List[Message]
    prompt_turns: int = 0  # the first turns are context only (a prompt/completion row's prompt): never trained
    plain_prompt: Optional[str] = None  # the prompt without a chat template (instruction layout, raw layouts)
    raw: bool = False  # never through a chat template: plain_prompt + the last turn (TRL's string prompt/completion)
    tools: str = ""  # the row's tool schemas (task.tools_field) as JSON, for the chat template; "" for none
    converted: int = 0  # the row's number and boolean cells that were written out as text


def plain_settings(cfg: Any) -> Any:
    """The task's settings as plain attributes (a SimpleNamespace): read once per row, an OmegaConf node costs
    more than the reading itself on large data sets."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True))
    return cfg


# --------------------------------------------------------------------------------------------- formats
def _text_column(cfg: Any) -> str:
    return (list(cfg.text_fields) or ["text"])[0]


def resolve_format(columns: Sequence[str], cfg: Any) -> str:
    """The layout of data with these columns: task.data_format, or for `auto` the first that fits of template
    (task.prompt_template set), chat, sharegpt, prompt_completion, instruction, text."""
    fmt, cols = str(cfg.data_format), set(columns)
    if fmt not in FORMATS:
        raise FrodCliError(f"unknown task.data_format {fmt!r}; use {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if cfg.prompt_template:
        return "template"
    for name in ("chat", "sharegpt", "prompt_completion", "instruction", "text"):
        if set(required_columns(name, cfg)) <= cols:
            return name
    raise FrodCliError(
        f"the data matches no format (task.data_format=auto): no column {cfg.messages_field!r} (chat), "
        f"{cfg.conversations_field!r} (sharegpt), {cfg.prompt_field!r}+{cfg.completion_field!r} (prompt_completion), "
        f"{cfg.instruction_field!r}+{cfg.output_field!r} (instruction) or {_text_column(cfg)!r} (text), and no "
        f"task.prompt_template; its columns are {sorted(cols)}")


def required_columns(fmt: str, cfg: Any) -> List[str]:
    """The columns a layout reads (an instruction row's input column is optional)."""
    if fmt == "chat":
        return [cfg.messages_field]
    if fmt == "sharegpt":
        return [cfg.conversations_field]
    if fmt == "prompt_completion":
        return [cfg.prompt_field, cfg.completion_field]
    if fmt == "instruction":
        return [cfg.instruction_field, cfg.output_field]
    if fmt == "text":
        return [_text_column(cfg)]
    if fmt == "template":
        if not cfg.prompt_template or cfg.response_template is None:
            raise FrodCliError("task.data_format=template needs task.prompt_template and task.response_template")
        return list(dict.fromkeys(templates.fields(cfg.prompt_template) + templates.fields(cfg.response_template)))
    raise FrodCliError(f"unknown task.data_format {fmt!r}; use {', '.join(FORMATS)}")


def check_columns(fmt: str, cfg: Any, columns: Sequence[str], where: str) -> None:
    """Refuses, in one line, data that lacks a column its layout reads."""
    if fmt == "text" and len(cfg.text_fields) != 1:
        raise FrodCliError(f"task.data_format=text reads one column, got task.text_fields={list(cfg.text_fields)}; "
                           "use data_format=template for prompt/response pairs")
    missing = [c for c in required_columns(fmt, cfg) if c not in columns]
    if missing:
        what = "template field" if fmt == "template" else "column"
        raise FrodCliError(f"{where} ({fmt} layout) has no {what} {', '.join(map(repr, missing))}; "
                           f"its columns are {list(columns)}")
    tools = getattr(cfg, "tools_field", None)
    if tools and tools in columns and fmt not in TOOL_LAYOUTS and tools not in required_columns(fmt, cfg):
        raise FrodCliError(f"{where} has a tools column {tools!r}, which the {fmt} layout does not read (the "
                           f"{', '.join(TOOL_LAYOUTS)} layouts pass it to the chat template): use one of those, or "
                           "task.tools_field=null to train without it")


# ------------------------------------------------------------------------------------------ rows -> turns
class Cells:
    """Reads a row's text cells: strings as they are, numbers and booleans written out (and counted: the log
    says how many cells were converted), OpenAI text parts joined."""

    def __init__(self) -> None:
        self.converted = 0

    def text(self, value: Any, what: str) -> str:
        if value is None:
            raise MalformedRow(f"{what} is missing")
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)):
            self.converted += 1
            return str(value)
        if isinstance(value, list) and value and all(isinstance(p, dict) and "type" in p for p in value):
            kinds = [p.get("type") for p in value if p.get("type") not in (None, "text")]
            if kinds:
                raise MalformedRow(f"{what} has a {kinds[0]!r} part; only text parts can be trained on")
            return "".join(self.text(p.get("text"), f"{what}'s text part") for p in value)
        raise MalformedRow(f"{what} is a {type(value).__name__}, not text")

    def count(self, row: Dict[str, Any], columns: Sequence[str]) -> None:
        """Count the cells of `columns` that a format string writes out from a number or a boolean."""
        self.converted += sum(isinstance(row.get(c), (bool, int, float)) for c in columns)


def message(role: str, content: str = "", tool_calls: str = "", name: str = "", tool_call_id: str = "") -> Message:
    """A stored turn (every key of MESSAGE_KEYS, strings)."""
    return {"role": role, "content": content, "tool_calls": tool_calls, "name": name, "tool_call_id": tool_call_id}


def _calls(turn: Dict[str, Any], role: str, content_key: str, where: str) -> Tuple[str, List[Dict[str, Any]]]:
    """(role, normalized tool calls) of a turn: a ShareGPT function_call turn's value is its calls; a chat turn's
    are under tool_calls (or OpenAI's older single function_call)."""
    try:
        if role == "function_call":
            calls = tool_calls.normalize_calls(turn.get(content_key), f"{where} {content_key!r}")
            if not calls:
                raise ValueError(f"{where} {content_key!r} holds no tool call")
            return "assistant", calls
        value = turn.get("tool_calls")
        calls = tool_calls.normalize_calls(turn.get("function_call") if value is None else value, f"{where} 'tool_calls'")
    except ValueError as e:
        raise MalformedRow(str(e)) from None
    if calls and role != "assistant":
        raise MalformedRow(f"{where} has tool calls; only an assistant turn calls a tool")
    return role, calls


def _turn(turn: Dict[str, Any], role: str, content_key: str, where: str, cells: Cells) -> Message:
    mapped, calls = _calls(turn, role, content_key, where)
    content = turn.get(content_key)
    if role == "function_call" or (calls and content is None):
        text = ""  # the value was the call itself, or an assistant turn that only calls (OpenAI: content null)
    else:
        text = cells.text(content, f"{where} {content_key!r}")
    extra = {k: str(turn.get(k) or "") for k in ("name", "tool_call_id")} if mapped == "tool" else {}
    return message(mapped, text, tool_calls.dumps(calls), **extra)


def _turns(value: Any, column: str, role_key: str, content_key: str, role_map: Optional[Dict[str, str]],
           cells: Cells) -> List[Message]:
    if value is None:
        raise MalformedRow(f"{column!r} is missing")
    if not isinstance(value, (list, tuple)):
        raise MalformedRow(f"{column!r} is a {type(value).__name__}, not a list of turns")
    if not value:
        raise MalformedRow(f"{column!r} holds no turn")
    out = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise MalformedRow(f"{column!r} turn {i} is a {type(turn).__name__}, not an object with {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if not isinstance(role, str) or not role:
            raise MalformedRow(f"{column!r} turn {i} has no {role_key!r}")
        if role_map is not None:
            if role not in role_map:
                raise MalformedRow(f"{column!r} turn {i}: role {role!r} is not in task.role_map ({', '.join(role_map)})")
            role = role_map[role]
        out.append(_turn(turn, role, content_key, f"{column!r} turn {i} ({turn.get(role_key)})", cells))
    return out


def role_map(cfg: Any) -> Dict[str, str]:
    """ShareGPT `from` -> role: task.role_map over the defaults; every target must be a role a template knows (or
    function_call: an assistant turn whose value is a tool call)."""
    mapping = {**DEFAULT_ROLE_MAP, "user": "user", "assistant": "assistant", "tool": "tool", **dict(cfg.role_map or {})}
    bad = {k: v for k, v in mapping.items() if v not in ROLES}
    if bad:
        k, v = next(iter(bad.items()))
        raise FrodCliError(f"task.role_map maps {k!r} to {v!r}: roles are {', '.join(ROLES)}")
    return mapping


def _tools(row: Dict[str, Any], cfg: Any) -> str:
    """The row's tool schemas (task.tools_field) as the JSON the schema carries; "" when it has none."""
    column = getattr(cfg, "tools_field", None)
    if not column or column not in row:
        return ""
    try:
        return tool_calls.dumps(tool_calls.normalize_tools(row[column], repr(column)))
    except ValueError as e:
        raise MalformedRow(str(e)) from None


def _with_system(messages: List[Message], cfg: Any) -> Tuple[List[Message], int]:
    """task.system_prompt as a first system turn when the conversation has none; (messages, turns added)."""
    if cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
        return [message("system", str(cfg.system_prompt))] + messages, 1
    return messages, 0


def _system_paragraph(cfg: Any, text: str) -> str:
    return f"{str(cfg.system_prompt).strip()}\n\n{text}" if cfg.system_prompt and str(cfg.system_prompt).strip() else text


def instruction_prompt(instruction: str, input: Optional[str] = None, system_prompt: Optional[str] = None) -> str:
    """The plain prompt layout of instruction data (no chat template)."""
    parts = [system_prompt.strip()] if system_prompt and system_prompt.strip() else []
    parts.append(f"### Instruction:\n{str(instruction).strip()}")
    if input is not None and str(input).strip():
        parts.append(f"### Input:\n{str(input).strip()}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def instruction_user_turn(instruction: str, input: Optional[str] = None) -> str:
    text = str(instruction).strip()
    return text + (f"\n\n{str(input).strip()}" if input is not None and str(input).strip() else "")


def _instruction(row: Dict[str, Any], cfg: Any, cells: Cells) -> Conversation:
    instruction = cells.text(row.get(cfg.instruction_field), repr(cfg.instruction_field))
    output = cells.text(row.get(cfg.output_field), repr(cfg.output_field))
    inp = row.get(cfg.input_field) if cfg.input_field else None
    inp = None if inp is None else cells.text(inp, repr(cfg.input_field))
    messages, _ = _with_system([message("user", instruction_user_turn(instruction, inp)), message("assistant", output)], cfg)
    return Conversation(messages, plain_prompt=instruction_prompt(instruction, inp, cfg.system_prompt))


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float))


def _prompt_completion(row: Dict[str, Any], cfg: Any, cells: Cells) -> Conversation:
    prompt, completion = row.get(cfg.prompt_field), row.get(cfg.completion_field)
    if _scalar(prompt) and _scalar(completion):
        if _tools(row, cfg):
            raise MalformedRow(f"{cfg.prompt_field!r} and {cfg.completion_field!r} are strings, which never go "
                               f"through a chat template: its tools ({cfg.tools_field!r}) need lists of turns")
        prompt, completion = cells.text(prompt, repr(cfg.prompt_field)), cells.text(completion, repr(cfg.completion_field))
        return Conversation([message("user", prompt), message("assistant", completion)],
                            plain_prompt=_system_paragraph(cfg, prompt), raw=True)
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        head = _turns(prompt, cfg.prompt_field, "role", "content", None, cells)
        tail = _turns(completion, cfg.completion_field, "role", "content", None, cells)
        messages, added = _with_system(head + tail, cfg)
        return Conversation(messages, prompt_turns=len(head) + added, tools=_tools(row, cfg))
    for value, name in ((prompt, cfg.prompt_field), (completion, cfg.completion_field)):
        if value is None:
            raise MalformedRow(f"{name!r} is missing")
    raise MalformedRow(f"{cfg.prompt_field!r} and {cfg.completion_field!r} must both be strings or both lists of "
                       f"turns, not a {type(prompt).__name__} and a {type(completion).__name__}")


def _read(row: Dict[str, Any], fmt: str, cfg: Any, cells: Cells) -> Conversation:
    if fmt == "chat":
        turns = _turns(row.get(cfg.messages_field), cfg.messages_field, "role", "content", None, cells)
        return Conversation(_with_system(turns, cfg)[0], tools=_tools(row, cfg))
    if fmt == "sharegpt":
        turns = _turns(row.get(cfg.conversations_field), cfg.conversations_field, "from", "value", role_map(cfg), cells)
        return Conversation(_with_system(turns, cfg)[0], tools=_tools(row, cfg))
    if fmt == "instruction":
        return _instruction(row, cfg, cells)
    if fmt == "prompt_completion":
        return _prompt_completion(row, cfg, cells)
    if fmt == "text":
        column = _text_column(cfg)
        return Conversation([message("assistant", cells.text(row.get(column), repr(column)))], plain_prompt="", raw=True)
    if fmt == "template":
        values = {k: "" if v is None else v for k, v in row.items()}
        cells.count(row, required_columns("template", cfg))
        prompt = templates.render(cfg.prompt_template, values, "task.prompt_template")
        response = templates.render(cfg.response_template, values, "task.response_template")
        return Conversation([message("user", prompt), message("assistant", response)],
                            plain_prompt=_system_paragraph(cfg, prompt), raw=True)
    raise FrodCliError(f"unknown task.data_format {fmt!r}; use {', '.join(FORMATS)}")


def read(row: Dict[str, Any], fmt: str, cfg: Any) -> Conversation:
    """A row as a Conversation, for any layout (text and template included); `converted` counts its number and
    boolean cells written out as text."""
    cells = Cells()
    conv = _read(row, fmt, cfg, cells)
    conv.converted = cells.converted
    return conv


def conversation(row: Dict[str, Any], fmt: str, cfg: Any) -> List[Message]:
    """The turns of one row, for fmt in instruction | chat | sharegpt | prompt_completion (role map, system prompt)."""
    return read(row, fmt, cfg).messages


# ------------------------------------------------------------------------------------- turns -> segments
def _render(tokenizer: Any, messages: List[Message], generation_prompt: bool, tools: Optional[list] = None) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([tool_calls.template_message(m) for m in messages], tools=tools or None,
                                             add_generation_prompt=generation_prompt, tokenize=False)
    except TemplateError as e:
        raise MalformedRow(f"the chat template cannot render it: {str(e).strip() or type(e).__name__}") from e


def _head(tokenizer: Any, before: List[Message], generation_prompt: bool, tools: Optional[list]) -> str:
    """The rendering before a trained turn; for a first turn, what the template puts before any message (a
    default system prompt, an opened assistant turn), or nothing when it cannot render an empty conversation."""
    if before:
        return _render(tokenizer, before, generation_prompt, tools)
    try:
        return _render(tokenizer, [], generation_prompt, tools)
    except Exception:  # noqa: BLE001 - many templates index messages[0]
        return ""


def trained_turns(messages: List[Message], train_roles: Sequence[str] = ("assistant",), prompt_turns: int = 0) -> List[int]:
    """The indices of the turns the loss covers: roles in train_roles, after the first prompt_turns."""
    trained = [i for i in range(prompt_turns, len(messages)) if messages[i]["role"] in train_roles]
    if not trained:
        where = " in the completion" if prompt_turns else ""
        raise MalformedRow(f"no {'/'.join(train_roles)} turn{where} to train on")
    return trained


def _check_tools_rendered(messages: List[Message], i: int, text: str, tools: Optional[list], rendering: str) -> None:
    """A template that ignores tool calls or tools would train on a turn without its call, or without the schemas
    it was answering from: refused, naming what is missing."""
    missing = [n for n in tool_calls.names(tool_calls.loads(messages[i].get("tool_calls") or "")) if n not in text]
    if missing:
        raise MalformedRow(f"the chat template does not render the tool calls of turn {i + 1} ({missing[0]!r} is "
                           "not in its rendering): use a template that does, e.g. task.chat_template=chatml")
    missing = [n for n in tool_calls.names(tools or []) if n not in rendering]
    if missing:
        raise MalformedRow(f"the chat template does not render the row's tools ({missing[0]!r} is not in its "
                           "rendering): use a template that does, e.g. task.chat_template=chatml")


def segments(messages: List[Message], tokenizer: Any, cfg: Any, *, train_roles: Sequence[str] = ("assistant",),
             prompt_turns: int = 0, plain_prompt: Optional[str] = None, raw: bool = False,
             tools: str = "") -> List[Tuple[str, bool]]:
    """[(text, trained)] of a conversation up to its last trained turn (a turn whose role is in train_roles,
    not among the first prompt_turns). With the tokenizer's chat template (and the row's tools) unless `raw`; a
    tokenizer without one renders [(plain_prompt, False), (last trained turn, True)] when the layout gives a
    plain_prompt, and is refused otherwise."""
    msgs = [{k: str(m.get(k) or "") for k in MESSAGE_KEYS} for m in messages]
    trained = trained_turns(msgs, train_roles, prompt_turns)
    if raw or not has_chat_template(tokenizer):
        if plain_prompt is None:
            raise FrodCliError("conversations need a tokenizer with a chat template (tokenizer.chat_template is not "
                               "set): give one with task.chat_template=chatml (or a Jinja string)")
        return [(plain_prompt, False), (msgs[trained[-1]]["content"], True)]
    schemas = tool_calls.loads(tools)
    msgs = msgs[: trained[-1] + 1]
    out: List[Tuple[str, bool]] = []
    prev = ""
    for i in trained:
        head = _head(tokenizer, msgs[:i], msgs[i]["role"] == "assistant", schemas)
        full = _render(tokenizer, msgs[: i + 1], False, schemas)
        if not head.startswith(prev) or not full.startswith(head):
            raise MalformedRow(f"the chat template does not render turn {i + 1} as a continuation of the turns "
                               "before it, so the trained tokens cannot be located")
        _check_tools_rendered(msgs, i, full[len(head):], schemas if i == trained[-1] else None, full)
        out += [(head[len(prev):], False), (full[len(head):], True)]
        prev = full
    return out


def conversation_segments(conv: Conversation, tokenizer: Any, cfg: Any,
                          train_roles: Sequence[str] = ("assistant",)) -> List[Tuple[str, bool]]:
    return segments(conv.messages, tokenizer, cfg, train_roles=train_roles, prompt_turns=conv.prompt_turns,
                    plain_prompt=conv.plain_prompt, raw=conv.raw, tools=conv.tools)


def templated(tokenizer: Any, raw: bool) -> bool:
    """Whether `segments` renders with the chat template (which then carries its own special tokens)."""
    return not raw and has_chat_template(tokenizer)


def token_segments(pieces: Sequence[Tuple[str, bool]], tokenizer: Any, *, with_template: bool,
                   leading: Sequence[int] = (), close: bool = True) -> List[Tuple[List[int], bool]]:
    """Each segment's token ids (tokenized apart, so a trained segment's tokens are exactly its own). A plain
    or raw rendering gets `leading` (the tokenizer's BOS) first; with `close`, the last segment ends with EOS
    unless the rendering already put one there."""
    out = [(list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else [], flag) for text, flag in pieces]
    if not with_template and leading:
        out.insert(0, (list(leading), False))
    eos = tokenizer.eos_token_id
    if close and eos is not None and out and eos not in out[-1][0]:
        out[-1] = (out[-1][0] + [eos], out[-1][1])
    return out


# ------------------------------------------------------------------------------------------ fitting max_length
def _prompt_candidates(messages: List[Message]) -> Tuple[List[List[Message]], List[Message]]:
    """(the prompts that keep a system turn, from the whole prompt to the one from its last user turn on; that
    last one without its system turn, or [] when it has none)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    starts = [0] + [i for i, m in enumerate(body) if i > 0 and m["role"] == "user"]
    return [system + body[s:] for s in starts], (body[starts[-1]:] if system else [])


def fit_prompt(messages: List[Message], measure: Callable[[List[Message]], int], max_length: int,
               answer_room: int) -> Optional[Tuple[List[Message], int]]:
    """The prompt-fitting rule, for every task whose answer follows a prompt (preference pairs; a prompt-only RL
    task too): `messages` are the turns before the answer, `measure(turns)` their length in tokens as rendered.
    Returns (the turns kept, how many were dropped), or None when not even the last user turn fits:
      1. the most recent whole turns that leave `answer_room` tokens for the answer: turns are dropped from the
         oldest, back to a user turn (the prompt still opens with one); a system turn is kept;
      2. when no such prompt leaves that room: the system turn and the last user turn onwards, if it leaves at least
         one token (the answer is then cut to what is left);
      3. else the same without the system turn, if that leaves one token."""
    candidates, bare = _prompt_candidates(messages)
    lengths: Dict[int, int] = {}

    def length(k: int) -> int:
        if k not in lengths:
            lengths[k] = measure(candidates[k])
        return lengths[k]

    lo, hi = 0, len(candidates)  # the first candidate that leaves answer_room (lengths fall along the list)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if length(mid) + answer_room <= max_length else (mid + 1, hi)
    if lo < len(candidates):
        return candidates[lo], len(messages) - len(candidates[lo])
    if length(len(candidates) - 1) < max_length:
        return candidates[-1], len(messages) - len(candidates[-1])
    if bare and measure(bare) < max_length:
        return bare, len(messages) - len(bare)
    return None


# -------------------------------------------------------------------------------------------- chat templates
def check_chat_template_setting(setting: Optional[str]) -> None:
    """Refuses, before any model loads, a task.chat_template that is neither null, a built-in name nor Jinja."""
    from frod_cli.chat_templates import BUILTIN, is_jinja

    if setting is not None and str(setting) not in BUILTIN and not is_jinja(str(setting)):
        raise FrodCliError(f"task.chat_template {setting!r} is neither a built-in ({', '.join(BUILTIN)}) nor a Jinja "
                           "template (one holds '{%' or '{{')")


def apply_chat_template_setting(tokenizer: Any, setting: Optional[str]) -> bool:
    """task.chat_template on a tokenizer: None keeps its own, a built-in name (chatml) or a Jinja string. True
    when special tokens were added (the model's embeddings must then grow to len(tokenizer))."""
    from frod_cli.chat_templates import install_chat_template

    try:
        return install_chat_template(tokenizer, setting)
    except ValueError as e:
        raise FrodCliError(str(e)) from e


# -------------------------------------------------------------------------------------------- malformed rows
@dataclass
class RowReport:
    """What reading one split gave: rows seen, rows that could not be read, the first of those."""

    split: str
    rows: int = 0
    malformed: int = 0
    first: Optional[Tuple[int, str]] = None  # (row, counted from 1; the reason)
    where: str = ""  # e.g. "source 'chat' " for a mixture

    def refusal(self) -> str:
        row, reason = self.first or (0, "")
        return (f"{self.where}split {self.split!r}: {self.malformed} of {self.rows} rows cannot be read; the first, "
                f"row {row}: {reason} (fix them, or task.skip_malformed=true drops them)")


class Guarded:
    """A reader (row -> output columns, raising MalformedRow) as a batched datasets map function: a malformed row
    gets `blank` outputs and its reason in `_malformed` ("" for a good row). Row numbers come from a `_row` column
    when the data carries one (the row's number in its source), else from the map's indices."""

    def __init__(self, reader: Callable[[Dict[str, Any]], Dict[str, Any]], blank: Dict[str, Any]):
        self.reader, self.blank = reader, dict(blank)

    def one(self, row: Dict[str, Any], index: int) -> Dict[str, Any]:
        number = int(row["_row"]) if row.get("_row") is not None else int(index)
        try:
            return {"_row": number, **self.reader(row), "_malformed": ""}
        except MalformedRow as e:
            return {**self.blank, "_row": number, "_malformed": str(e) or "unreadable"}

    def __call__(self, batch: Dict[str, list], indices: List[int]) -> Dict[str, list]:
        out: Dict[str, list] = {k: [] for k in [*self.blank, "_malformed"]}
        for i, vals in zip(indices, zip(*batch.values())):
            res = self.one(dict(zip(batch, vals)), i)
            for k in out:
                out[k].append(res[k])
        return out


def blank_of(features: Any) -> Dict[str, Any]:
    """Placeholder outputs of a malformed row, by feature type (it is dropped or refused right after)."""
    import datasets

    out: Dict[str, Any] = {}
    for name, feat in features.items():
        if isinstance(feat, (list, datasets.Sequence)) or type(feat).__name__ == "List":
            out[name] = []
        elif isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
            out[name] = ""
        elif isinstance(feat, datasets.Value) and feat.dtype == "bool":
            out[name] = False
        else:
            out[name] = 0
    return out


def read_rows(dataset: Any, reader: Callable[[Dict[str, Any]], Dict[str, Any]], cfg: Any, split: str, *,
              features: Any, fingerprint: Optional[str] = None, where: str = "", desc: Optional[str] = None):
    """(dataset of the reader's outputs, RowReport) for one split. A reader raises MalformedRow for a row it
    cannot read: such rows refuse the split in one line (the first row, its reason, how many), or with
    task.skip_malformed=true are dropped and counted in a warning. `features` types the outputs (a `_row`
    column, the row's number in its source counted from 0, is added when the reader gives none); `fingerprint`
    names the result in datasets' cache (the next run on the same data and settings loads it)."""
    import datasets
    import numpy as np

    feats = datasets.Features({**features, "_row": datasets.Value("int64"), "_malformed": datasets.Value("string")})
    guard = Guarded(reader, blank_of(feats))
    del guard.blank["_malformed"]
    out = dataset.map(guard, batched=True, with_indices=True, remove_columns=dataset.column_names, features=feats,
                      new_fingerprint=fingerprint, desc=desc or f"reading {split}")
    reasons = out["_malformed"]
    bad = np.flatnonzero(np.asarray([bool(r) for r in reasons], dtype=bool))
    report = RowReport(split=split, rows=len(out), malformed=int(len(bad)), where=where)
    if len(bad):
        first = int(bad[0])
        report.first = (int(out[first]["_row"]) + 1, reasons[first])
        if not getattr(cfg, "skip_malformed", False):
            raise FrodCliError(report.refusal())
        log.warning("%ssplit %r: dropped %d of %d rows that cannot be read (task.skip_malformed=true); the first, "
                    "row %d: %s", where, split, report.malformed, report.rows, *report.first)
        keep = np.flatnonzero(~np.isin(np.arange(len(out)), bad))
        out = out.select(keep)
    return out.remove_columns("_malformed"), report
