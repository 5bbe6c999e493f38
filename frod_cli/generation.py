"""Batched generation with a causal LM, shared by the causal_lm task's evaluation and `frod generate`.

`generate_ids` / `generate_texts` take prompts as token ids (the task passes the exact prompt tokens it
trained with) or strings (tokenized by `encode_prompt`), left-pad each batch, run `model.generate` and
return only the new tokens. Greedy unless `do_sample`; sampling knobs are passed only when sampling, so
a model's own sampling defaults never leak into greedy decoding.

`run_generate(cfg)` is the verb `frod generate path=<run dir | model dir> prompt="..." | prompts=<file>`
(cfg: `frod_cli.config.GenerateRunConfig`):
  - a run directory (`.hydra/config.yaml`) of a causal-LM task loads `merged/` (AutoModelForCausalLM and
    its tokenizer); `use_adapter=true`, or a run without merged/, loads the run's base model + `adapter/`
    through its method: both via `frod_cli.training.builders.load_trained`, as `frod eval` does;
  - any other directory must hold a saved causal LM (config.json) and its tokenizer;
  - prompts go through the tokenizer's chat template when it has one (`chat=null`), or when `chat=true`
    (refused if it has none); otherwise a run trained with the causal_lm instruction layout gets its
    prompts wrapped in that layout (`### Instruction: ... ### Response:`), and anything else is fed raw;
  - every answer is printed; `output=<file>` also writes {prompt, answer} JSONL.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from frod_cli import FrodCliError

log = logging.getLogger("frod.generate")

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
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                    ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p) :] = 1
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


# ---------------------------------------------------------------------------------------------- the verb
def read_prompts(cfg: Any) -> List[str]:
    """cfg.prompt and/or the prompts in cfg.prompts (text: one per line; .jsonl: a "prompt" field per line)."""
    prompts: List[str] = []
    if cfg.prompt is not None:
        if not str(cfg.prompt).strip():
            raise FrodCliError("prompt is empty")
        prompts.append(str(cfg.prompt))
    if cfg.prompts is not None:
        path = Path(os.path.expanduser(str(cfg.prompts)))
        if not path.is_file():
            raise FrodCliError(f"prompts file not found: {cfg.prompts}")
        lines = path.read_text(encoding="utf-8").splitlines()
        found: List[str] = []
        if path.suffix.lower() == ".jsonl":
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise FrodCliError(f"{cfg.prompts} line {n} is not JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                    raise FrodCliError(f"{cfg.prompts} line {n} has no \"prompt\" string")
                found.append(row["prompt"])
        else:
            found = [line for line in lines if line.strip()]
        if not found:
            raise FrodCliError(f"prompts file {cfg.prompts} holds no prompts")
        prompts += found
    if not prompts:
        raise FrodCliError('nothing to generate from: give prompt="..." or prompts=<file>')
    return prompts


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)


def _check_saved(directory: str, shown: str) -> None:
    """Refuse a directory without a saved model, or one holding something other than a causal LM."""
    import transformers

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FrodCliError(f"no model in {shown} (no config.json): give a run directory or a saved causal LM")
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise FrodCliError(f"could not read the model config in {shown}: {str(e).strip().splitlines()[0]}") from None
    if not _is_causal(config):
        raise FrodCliError(f"{shown} holds a {', '.join(config.architectures)}, not a causal LM: frod generate needs one")


def _causal_task_config() -> Any:
    from omegaconf import OmegaConf

    from frod_cli.config import TaskConfig

    return OmegaConf.merge(OmegaConf.structured(TaskConfig),
                           {"type": "causal_lm", "name": "generate", "objective": "loss", "objective_mode": "min"})


def load_generation_model(cfg: Any) -> Tuple[Any, Any, Optional[Any], str]:
    """(model, tokenizer, the run's task config or None, what was loaded) for a GenerateRunConfig."""
    from frod_cli.runs import is_run_dir, load_run_config
    from frod_cli.tasks import get_task
    from frod_cli.training.builders import load_trained

    path = os.path.abspath(os.path.expanduser(str(cfg.path)))
    if not os.path.exists(path):
        raise FrodCliError(f"no such run directory or model: {cfg.path}")
    if not is_run_dir(path):
        if cfg.use_adapter:
            raise FrodCliError(f"use_adapter=true needs a run directory; {cfg.path} has no .hydra/config.yaml")
        _check_saved(path, cfg.path)
        t = load_trained(path, task_cfg=_causal_task_config(), load_data=False)
        return t.model, t.preprocessor, None, cfg.path

    run = load_run_config(path)
    task_cls = get_task(run.task.type)
    if task_cls.auto_class != "AutoModelForCausalLM":
        raise FrodCliError(f"{cfg.path} was trained for task type {run.task.type!r} ({task_cls.auto_class}); "
                           "frod generate needs a causal LM run")
    # merged/ (or base + adapter/ with use_adapter=true, or when merged/ is missing), as `frod eval` loads it
    t = load_trained(path, use_adapter=bool(cfg.use_adapter), load_data=False)
    return t.model, t.preprocessor, run.task, f"{cfg.path} ({t.what})"


def _layout_for(run_task: Optional[Any]) -> bool:
    """Whether prompts get the causal_lm instruction layout: a causal_lm run trained on instruction data."""
    if run_task is None or run_task.type != "causal_lm":
        return False
    return run_task.data_format == "instruction" or (run_task.data_format == "auto" and not run_task.prompt_template)


def run_generate(cfg: Any) -> List[Dict[str, str]]:
    """`frod generate`: print (and optionally write) an answer for every prompt; returns the records."""
    from transformers import set_seed

    prompts = read_prompts(cfg)  # bad input is refused before a model is loaded
    model, tok, run_task, what = load_generation_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model.to(device).eval()
    chat = has_chat_template(tok) if cfg.chat is None else bool(cfg.chat)
    if chat and not has_chat_template(tok):
        raise FrodCliError(f"chat=true but the tokenizer of {what} has no chat template (set chat=false)")
    system = cfg.system_prompt if cfg.system_prompt is not None else (run_task.system_prompt if run_task is not None else None)
    if chat:
        ids = [encode_prompt(tok, p, True, system) for p in prompts]
    elif _layout_for(run_task):
        from frod_cli.tasks.causal_lm import instruction_prompt

        ids = [encode_prompt(tok, instruction_prompt(p, None, system)) for p in prompts]
    else:
        ids = [encode_prompt(tok, p, False, system) for p in prompts]
    set_seed(int(cfg.seed))
    answers = generate_texts(model, tok, ids, batch_size=int(cfg.batch_size), **sampling_settings(cfg))
    records = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    for r in records:
        print(f">>> {r['prompt']}")
        print(r["answer"])
        print()
    if cfg.output:
        from frod_cli.runs import atomic_write_text

        out = Path(os.path.expanduser(str(cfg.output)))
        atomic_write_text(str(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {out}")
    return records
