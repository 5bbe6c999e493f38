"""`frod generate path=<run dir | model dir> prompt="..." | prompts=<file>` (+ the sampling keys of
frod_cli.config.GenerateRunConfig): answers of a causal LM, through the decoding helpers (frod_cli/decoding.py)
that the causal_lm task's evaluation uses too.
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

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from frod_cli import FrodCliError, one_line
from frod_cli.commands import register_verb

log = logging.getLogger("frod.generate")


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
        raise FrodCliError(f"could not read the model config in {shown}: {one_line(e)}") from None
    if not _is_causal(config):
        raise FrodCliError(f"{shown} holds a {', '.join(config.architectures)}, not a causal LM: frod generate needs one")


def _causal_task_config() -> Any:
    from frod_cli.tasks import task_config

    return task_config("causal_lm", name="generate")


def load_generation_model(cfg: Any) -> Tuple[Any, Any, Optional[Any], str, Optional[Any]]:
    """(model, tokenizer, the run's task config or None, what was loaded, the method that loaded adapter/ or
    None) for a GenerateRunConfig."""
    from frod_cli.runs import is_run_dir, read_config
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
        return t.model, t.preprocessor, None, cfg.path, None

    task_type = str((read_config(path).get("task") or {}).get("type"))  # checked before anything loads
    try:
        task_cls = get_task(task_type)
    except ValueError as e:
        raise FrodCliError(f"{cfg.path}: .hydra/config.yaml names no task this version knows ({e})") from None
    if task_cls.auto_class != "AutoModelForCausalLM":
        raise FrodCliError(f"{cfg.path} was trained for task type {task_type!r} ({task_cls.auto_class}); "
                           "frod generate needs a causal LM run")
    # merged/ (or base + adapter/ with use_adapter=true, or when merged/ is missing), as `frod eval` loads it; the
    # run's config is read once (its per_method line logged once)
    t = load_trained(path, use_adapter=bool(cfg.use_adapter), load_data=False)
    return t.model, t.preprocessor, t.run.task, f"{cfg.path} ({t.what})", t.method


def _layout_for(run_task: Optional[Any], run_dir: str) -> bool:
    """Whether prompts get the causal_lm instruction layout: a causal_lm run trained on instruction data only.
    The layout a run read (`data_format=auto` resolves it from the columns) is in its metrics.json; a run
    without one is judged by its config."""
    from frod_cli.runs import read_metrics

    if run_task is None or run_task.type != "causal_lm":
        return False
    final = read_metrics(run_dir) if os.path.isdir(run_dir) else None
    sources = ((final or {}).get("data_counts") or {}).get("sources") or {}
    formats = {s.get("format") for s in sources.values() if isinstance(s, dict)}
    if formats:
        return formats == {"instruction"}
    return run_task.data_format == "instruction" or (run_task.data_format == "auto" and not run_task.prompt_template)


@register_verb("generate", config="generate",
               summary='answers of a causal-LM run or model:  frod generate path=<run dir> prompt="..." | prompts=<file>')
def run(cfg: Any) -> List[Dict[str, str]]:
    """`frod generate`: print (and optionally write) an answer for every prompt; returns the records."""
    import torch
    from transformers import set_seed

    from frod_cli.config import check_sampling
    from frod_cli.decoding import encode_prompt, generate_texts, has_chat_template, sampling_settings
    from frod_cli.runs.directory import check_output
    from frod_cli.runs.lock import hold_output
    from frod_cli.training.builders import quiet_libraries

    quiet_libraries()
    check_sampling(cfg)  # bad input is refused before a model is loaded
    if cfg.output:
        check_output(os.path.abspath(os.path.expanduser(str(cfg.output))), bool(cfg.overwrite))
        hold_output(os.path.abspath(os.path.expanduser(str(cfg.output))))
    prompts = read_prompts(cfg)
    model, tok, run_task, what, method = load_generation_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model.to(device).eval()
    chat = has_chat_template(tok) if cfg.chat is None else bool(cfg.chat)
    if chat and not has_chat_template(tok):
        raise FrodCliError(f"chat=true but the tokenizer of {what} has no chat template (set chat=false)")
    system = cfg.system_prompt if cfg.system_prompt is not None else (run_task.system_prompt if run_task is not None else None)
    if chat:
        ids = [encode_prompt(tok, p, True, system) for p in prompts]
    elif _layout_for(run_task, os.path.abspath(os.path.expanduser(str(cfg.path)))):
        from frod_cli.tasks.causal_lm import instruction_prompt

        ids = [encode_prompt(tok, instruction_prompt(p, None, system)) for p in prompts]
    else:
        ids = [encode_prompt(tok, p, False, system) for p in prompts]
    set_seed(int(cfg.seed))
    with method.evaluation_context(model) if method is not None else contextlib.nullcontext():
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
