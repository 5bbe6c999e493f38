"""Tool calling in conversations: tool calls and tool schemas in OpenAI's form, read from any layout, carried as JSON
strings through the conversation schema (a fixed Arrow schema: frod_cli/tasks/lm_data.py) and decoded for the
chat template.

A tool call is `{type: function, function: {name, arguments}}` (its `id` kept when given); `arguments` is a JSON
object, given as an object or as a JSON string (OpenAI's API sends a string). The bare form `{name, arguments}`
(ShareGPT's `function_call` value, as LLaMA-Factory writes it) is read too, and a value that is a list holds
parallel calls. Tools (the `tools` column) are a list of JSON schemas, or a JSON string of one (LLaMA-Factory's
form); a bare function schema `{name, parameters, ...}` is wrapped as `{type: function, function: ...}`. They reach
the chat template as transformers' `apply_chat_template(messages, tools=...)` passes them.

Every function here raises ValueError with the reason alone; the layout reader adds where (row, turn) it is.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

# The text of one call, as the built-in ChatML template writes it (frod_cli/chat_templates.py) and as a tool-call
# turn's reference answer reads (Hermes-style: the call's JSON inside <tool_call> tags).
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def _decoded(value: Any, what: str) -> Any:
    """A JSON string decoded; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def normalize_call(call: Any, what: str = "the tool call") -> Dict[str, Any]:
    """One call as {type: function, function: {name, arguments: dict}} (+ id)."""
    call = _decoded(call, what)
    if not isinstance(call, dict):
        raise ValueError(f"{what} is a {_kind(call)}, not an object with a name and arguments")
    if call.get("type", "function") != "function":
        raise ValueError(f"{what} has type {call.get('type')!r}; only function calls can be trained on")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} has no function name")
    args = _decoded(fn.get("arguments"), f"{what} ({name}) arguments")
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise ValueError(f"{what} ({name}) arguments are a {_kind(args)}, not a JSON object")
    out: Dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if call.get("id") not in (None, ""):
        out["id"] = str(call["id"])
    return out


def normalize_calls(value: Any, what: str = "tool_calls") -> List[Dict[str, Any]]:
    """A turn's calls: one call or a list of them (parallel calls), each normalized; [] for none."""
    value = _decoded(value, what)
    if value is None:
        return []
    if isinstance(value, dict):
        return [normalize_call(value, what)]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} is a {_kind(value)}, not a list of tool calls")
    return [normalize_call(c, f"{what} call {i}") for i, c in enumerate(value, 1)]


def normalize_tools(value: Any, what: str = "tools") -> List[Dict[str, Any]]:
    """The tool schemas of a row: a list (or a JSON string of one) of {type: function, function: {name, ...}} or
    bare {name, ...} schemas; [] for none (null, "", [])."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    value = _decoded(value, what)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} is a {_kind(value)}, not a list of tool schemas")
    out = []
    for i, tool in enumerate(value, 1):
        if not isinstance(tool, dict):
            raise ValueError(f"{what} item {i} is a {_kind(tool)}, not a tool schema (an object)")
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ValueError(f"{what} item {i} has no function name")
        out.append(tool if fn is not tool else {"type": "function", "function": tool})
    return out


def dumps(value: Any) -> str:
    """The JSON string the conversation schema carries ("" for no calls / no tools)."""
    return json.dumps(value, ensure_ascii=False) if value else ""


def loads(text: str) -> List[Dict[str, Any]]:
    return json.loads(text) if text else []


def names(calls_or_tools: List[Dict[str, Any]]) -> List[str]:
    """The function names of calls or tool schemas (both normalized)."""
    return [(c.get("function") or c)["name"] for c in calls_or_tools]


def call_text(call: Dict[str, Any]) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return CALL_OPEN + body + CALL_CLOSE


def answer_text(message: Dict[str, Any]) -> str:
    """What an assistant turn says: its content, then each of its calls as call_text (a generation's reference)."""
    parts = [str(message.get("content") or "")] + [call_text(c) for c in loads(message.get("tool_calls") or "")]
    return "\n".join(p for p in parts if p)


def template_message(message: Dict[str, Any]) -> Dict[str, Any]:
    """A stored turn (all strings) as the chat template reads it: tool_calls decoded, empty keys left out."""
    out: Dict[str, Any] = {"role": str(message["role"]), "content": str(message.get("content") or "")}
    calls = loads(message.get("tool_calls") or "")
    if calls:
        out["tool_calls"] = calls
    for key in ("name", "tool_call_id"):
        if message.get(key):
            out[key] = str(message[key])
    return out
