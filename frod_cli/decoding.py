"""Batched generation with a causal LM, shared by the causal_lm task's evaluation and `frod generate`: it sits
below both (it imports neither the tasks nor the verbs).

`generate_ids` / `generate_texts` take prompts as token ids (the task passes the exact prompt tokens it
trained with) or strings (tokenized by `encode_prompt`), left-pad each batch, run `model.generate` and
return only the new tokens. Greedy unless `do_sample`; sampling knobs are passed only when sampling, so
a model's own sampling defaults never leak into greedy decoding.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from frod_cli import FrodCliError

Prompt = Union[str, Sequence[int]]


# ------------------------------------------------------------------------------------------ tokenizing
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def leading_special_ids(tokenizer: Any) -> List[int]:
    """The ids a tokenizer puts before the text with add_special_tokens=True (e.g. LLaMA's BOS). Trailing
    specials (BERT's [SEP], an EOS some tokenizers append) are left out: a prompt must not end a sequence."""
    with_ = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if not without:
        return []
    for k in range(len(with_) - len(without) + 1):
        if with_[k : k + len(without)] == without:
            return with_[:k]
    return []


def chat_messages(text: str, system_prompt: Optional[str] = None) -> List[Dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": text}]


def encode_prompt(tokenizer: Any, text: str, chat: bool = False, system_prompt: Optional[str] = None) -> List[int]:
    """Token ids of one prompt: through the chat template (with the generation prompt) when `chat`, else the
    tokenizer's leading specials + the text."""
    if chat:
        if not has_chat_template(tokenizer):
            raise FrodCliError("chat=true but the tokenizer has no chat template (set chat=false)")
        rendered = tokenizer.apply_chat_template(chat_messages(text, system_prompt), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if system_prompt:
        text = f"{system_prompt.strip()}\n\n{text}"
    return leading_special_ids(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id_of(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


# ------------------------------------------------------------------------------------------ generating
def sampling_settings(node: Any) -> Dict[str, Any]:
    """The `generation_config` keywords from a config holding frod_cli.config.SamplingConfig's keys
    (task.generation, or `frod generate`'s own)."""
    from frod_cli.config import SamplingConfig

    return {f.name: node[f.name] for f in dataclasses.fields(SamplingConfig)}  # generation_config casts them


def generation_config(model: Any, tokenizer: Any, *, max_new_tokens: int = 32, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50, num_beams: int = 1,
                      repetition_penalty: float = 1.0) -> Any:
    """The model's generation config with our settings; sampling knobs only when sampling."""
    import transformers

    base = getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else transformers.GenerationConfig()
    gc.max_new_tokens = int(max_new_tokens)
    gc.max_length = None
    gc.num_beams = int(num_beams)
    gc.num_return_sequences = 1
    gc.repetition_penalty = float(repetition_penalty)
    gc.do_sample = bool(do_sample)
    if do_sample:
        gc.temperature, gc.top_p, gc.top_k = float(temperature), float(top_p), int(top_k)
    else:
        gc.temperature, gc.top_p, gc.top_k = None, None, None
    gc.pad_token_id = pad_id_of(tokenizer)
    if gc.eos_token_id is None and tokenizer.eos_token_id is not None:
        gc.eos_token_id = tokenizer.eos_token_id
    return gc


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(prompts), longest], each prompt at the right end: every prompt ends where
    generation starts."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 16,
                 **settings: Any) -> List[List[int]]:
    """The new token ids for each prompt (token ids), generated `batch_size` prompts at a time with left
    padding; settings as in `generation_config`. Stops at EOS; the EOS and anything after it are dropped."""
    if batch_size < 1:
        raise FrodCliError(f"generation batch_size must be positive, got {batch_size}")
    gc = generation_config(model, tokenizer, **settings)
    eos = gc.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = gc.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: List[List[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = [list(map(int, p)) for p in prompts[start : start + batch_size]]
                if any(not p for p in chunk):
                    raise FrodCliError("an empty prompt cannot be generated from")
                ids, mask = left_pad(chunk, pad)
                width = ids.shape[1]
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
                for row in gen[:, width:].tolist():
                    cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
                    out.append(row[:cut])
    finally:
        if was_training:
            model.train()
    return out


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], batch_size: int = 16, chat: bool = False,
                   system_prompt: Optional[str] = None, **settings: Any) -> List[str]:
    """Decoded new text for each prompt (a string, encoded by `encode_prompt`, or token ids)."""
    ids = [encode_prompt(tokenizer, p, chat, system_prompt) if isinstance(p, str) else list(p) for p in prompts]
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in generate_ids(model, tokenizer, ids, batch_size, **settings)]


def sample_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
               **settings: Any) -> Tuple[List[List[int]], List[bool]]:
    """One `generate` call over `prompts` (token ids, left-padded; settings as in `generation_config`, e.g.
    do_sample=True): for each row its new tokens up to and including the first EOS (a completion that is scored
    and trained on ends with it), and whether it ended with EOS (False: cut at max_new_tokens). Sampling draws
    from the global RNG of the model's device: the caller seeds it (frod_cli.rl.rollout.sampling_rng)."""
    gc = generation_config(model, tokenizer, **settings)
    eos = gc.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    if any(not p for p in prompts):
        raise FrodCliError("an empty prompt cannot be generated from")
    ids, mask = left_pad(prompts, gc.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
    finally:
        model.train(was_training)
    rows, ended = [], []
    for row in gen[:, ids.shape[1] :].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_set), None)
        rows.append(row if cut is None else row[: cut + 1])
        ended.append(cut is not None)
    return rows, ended
