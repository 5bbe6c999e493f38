"""Chat templates frod can give a tokenizer that has none (`task.chat_template`, the offline `tiny:llama-chat`).

A built-in is named; anything else given as a template is taken as a Jinja string, as transformers'
`apply_chat_template` reads it. Installing ChatML adds its turn markers as special tokens when the vocabulary
lacks them and makes the end-of-turn marker the EOS token, the way TRL's `setup_chat_format` and axolotl's
`chat_template: chatml` do: generation then stops at the end of the assistant's turn. A model trained with such a
tokenizer needs its embeddings resized to `len(tokenizer)` (`resize_embeddings`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

# ChatML: every turn is <|im_start|>{role}\n{content}<|im_end|>\n; the generation prompt opens an assistant turn.
# Tools (our own layout, in the spirit of Hermes / Qwen ChatML): the schemas go into the system turn (the
# conversation's own system text first), one JSON per line inside <tools></tools>; an assistant turn writes each
# of its calls after its text as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> (the form
# frod_cli.tasks.tool_calls.call_text writes: a tool-call turn's reference answer); a tool's output is a turn of
# its own, role `tool`. Without tools and tool calls the rendering is plain ChatML.
_TOOLS_SYSTEM = (
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'Functions you can call, one JSON schema a line:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson + '\\n' }}{% endfor %}"
    "{{ '</tools>\\nTo call one, write <tool_call>\\n{\"name\": ..., \"arguments\": {...}}\\n</tool_call>; its "
    "output comes back in a tool turn.<|im_end|>\\n' }}"
)
_CALLS = (
    "{% for call in message['tool_calls'] %}"
    "{{ ('\\n' if (message['content'] or not loop.first) else '') + '<tool_call>\\n{\"name\": ' "
    "+ call['function']['name'] | tojson + ', \"arguments\": ' + call['function']['arguments'] | tojson "
    "+ '}\\n</tool_call>' }}"
    "{% endfor %}"
)
CHATML = (
    "{% if tools %}" + _TOOLS_SYSTEM + "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}" + _CALLS + "{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

BUILTIN: Dict[str, Dict[str, Any]] = {
    "chatml": {"template": CHATML, "special_tokens": list(CHATML_TOKENS), "eos": "<|im_end|>"},
}


def is_jinja(value: str) -> bool:
    return "{%" in value or "{{" in value


def install_chat_template(tokenizer: Any, template: Optional[str]) -> bool:
    """Give `tokenizer` the chat template `template`: None keeps its own, a built-in name (`chatml`) or a Jinja
    string. Returns True when tokens were added to the vocabulary (the model's embeddings must grow)."""
    if template is None:
        return False
    name = str(template)
    if name in BUILTIN:
        spec = BUILTIN[name]
        vocab = tokenizer.get_vocab()
        missing: List[str] = [t for t in spec["special_tokens"] if t not in vocab]
        added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
        tokenizer.chat_template = spec["template"]
        if spec.get("eos"):
            tokenizer.eos_token = spec["eos"]
        return bool(added)
    if not is_jinja(name):
        raise ValueError(f"task.chat_template {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor a Jinja "
                         "template (one holds '{%' or '{{')")
    tokenizer.chat_template = name
    return False


def resize_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the model's token embeddings (and tied or untied output layer) to the tokenizer's vocabulary, and
    point its config at the tokenizer's EOS / pad ids."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    for key in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            setattr(model.config, key, value)
            gc = getattr(model, "generation_config", None)
            if gc is not None:
                setattr(gc, key, value)


def set_chat_template(model: Any, tokenizer: Any, template: Optional[str]) -> None:
    """`task.chat_template` on a freshly loaded model and its tokenizer: the template installed and the model
    pointed at the tokenizer's vocabulary and EOS. New embedding rows (ChatML's markers on a base that lacks them)
    are drawn with a fixed seed, so every load of the same base (train, eval, merge, an adapter's reload) gets
    the same rows; merged/ saves them, and the tokenizer saved beside it carries the template."""
    if template is None:
        return
    import torch

    import logging

    from transformers.utils import logging as hf_logging

    install_chat_template(tokenizer, template)
    rows = model.get_input_embeddings().weight.shape[0]
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on mean resizing, once per run: the line below says what happened
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            resize_embeddings(model, tokenizer)
    finally:
        hf_logging.set_verbosity(level)
    if model.get_input_embeddings().weight.shape[0] > rows:
        logging.getLogger("frod.models").info(
            "chat template %s: %d tokens added to the vocabulary, embeddings resized to %d rows", template if len(str(template)) < 20
            else "(Jinja)", model.get_input_embeddings().weight.shape[0] - rows, model.get_input_embeddings().weight.shape[0])
