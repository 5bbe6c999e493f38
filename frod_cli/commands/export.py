"""`frod export path=<run dir> format=peft|lora|merged [output=<dir>]`: a trained run where it is served.

  format=peft     the adapter in PEFT's own format (PeftModel.from_pretrained): a frod run's FRoD adapter rewritten
                  as PEFT's FRoD adapter and checked by reloading it with PEFT; a PEFT method's adapter as it is
  format=lora     rank=<r> | energy=<fraction>: each FRoD dW as a truncated-SVD LoRA pair (vLLM, SGLang,
                  transformers' load_adapter), with the error per layer and the validation metric of both models
  format=merged   dtype=<dtype>: the plain transformers model (what `frod merge` writes), in that dtype

Everything the user gave is checked before a model loads; the output is built in a temporary sibling, checked, and
renamed into place, so a refused or failed export leaves nothing and changes nothing in the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict

from frod_cli import FrodCliError
from frod_cli.commands import register_verb
from frod_cli.runs.directory import missing_dirs, remove_if_empty

FORMATS = ("peft", "lora", "merged")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TOLERANCE = 1e-3  # see docs/SERVING.md: float32 rounding of PEFT's rebuild is ~1e-6, basis mixing larger
PEFT_METHODS = ("lora", "dora", "pissa", "vera", "peft_frod")


@dataclass
class Source:
    run_dir: str
    run: Any  # the run's config
    kind: str  # "adapter" | "merged": what the export reads


def check_options(cfg: Any) -> None:
    """Refuse, before anything loads, what the chosen format cannot use or does not understand."""
    fmt = cfg.format
    if fmt not in FORMATS:
        raise FrodCliError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for key, used_by in (("rank", "lora"), ("energy", "lora"), ("dtype", "merged"), ("tolerance", "peft")):
        if cfg[key] is not None and fmt != used_by:
            raise FrodCliError(f"format={fmt} takes no {key} ({key}= is for format={used_by})")
    if fmt == "lora":
        if (cfg.rank is None) == (cfg.energy is None):
            raise FrodCliError("format=lora takes rank=<r> (every layer at rank r) or energy=<fraction> (per layer, "
                               "the smallest rank keeping that share of dW's squared singular values), one of the two")
        if cfg.rank is not None and int(cfg.rank) <= 0:
            raise FrodCliError(f"rank must be a positive integer, got {cfg.rank}")
        if cfg.energy is not None and not 0.0 < float(cfg.energy) <= 1.0:
            raise FrodCliError(f"energy must lie in (0, 1], got {cfg.energy}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise FrodCliError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.tolerance is not None and not float(cfg.tolerance) > 0.0:
        raise FrodCliError(f"tolerance must be > 0, got {cfg.tolerance}")
    if int(cfg.check_batch_size) < 1:
        raise FrodCliError(f"check_batch_size must be at least 1, got {cfg.check_batch_size}")


def resolve_source(path: str, fmt: str) -> Source:
    """A run directory, or its adapter/ or merged/ (which then is what the export reads)."""
    from frod_cli.runs import RunPaths, is_run_dir, load_run_config

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FrodCliError(f"path {path}: no such directory")
    kind = None
    if not is_run_dir(path) and os.path.basename(path) in ("adapter", "merged") and is_run_dir(os.path.dirname(path)):
        path, kind = os.path.dirname(path), os.path.basename(path)
    if not is_run_dir(path):
        raise FrodCliError(f"path {path} is not a run directory (no .hydra/config.yaml), nor a run's adapter/ or "
                           "merged/")
    paths = RunPaths.of(path)
    kind = kind or ("adapter" if paths.adapter.is_dir() else "merged")
    if not (paths.root / kind).is_dir():
        raise FrodCliError(f"run {path} has no {kind}/" if kind == "adapter" or paths.adapter.is_dir()
                           else f"run {path} has neither adapter/ nor merged/")
    if fmt != "merged" and kind != "adapter":
        has = f"{path}/merged holds a merged model (format=merged)" if paths.adapter.is_dir() else f"{path} has none"
        raise FrodCliError(f"format={fmt} exports the run's adapter/; {has}")
    return Source(path, load_run_config(path), kind)


def check_method(fmt: str, run: Any) -> None:
    name = run.method.name
    if run.model.get("quantization", "none") != "none" and fmt != "lora":
        raise FrodCliError(f"the run's base is {run.model.quantization} 4-bit: format={fmt} is not available for it "
                           "(format=lora exports its update; `frod merge base=<the unquantized original>` merges it)")
    if fmt == "lora" and name != "frod":
        what = {"lora": "is LoRA already: format=peft copies it", "pissa": "is LoRA already: format=peft copies it",
                "dora": "is DoRA: format=peft copies it, format=merged folds it in",
                "full": "trained every weight: format=merged"}.get(
            name, "has no FRoD update to convert: format=peft or format=merged")
        raise FrodCliError(f"format=lora converts a frod run's update; this {name} run {what}")
    if fmt == "peft" and name not in ("frod",) + PEFT_METHODS:
        raise FrodCliError(f"format=peft needs an adapter; a {name} run has none: format=merged")


def resolve_output(cfg: Any, src: Source) -> str:
    from frod_cli.runs.directory import check_output
    from frod_cli.runs.lock import hold_output

    out = os.path.abspath(cfg.output or os.path.join(src.run_dir, f"export-{cfg.format}"))
    read = os.path.join(src.run_dir, src.kind)
    if out == read or out.startswith(read + os.sep) or src.run_dir == out or src.run_dir.startswith(out + os.sep):
        raise FrodCliError(f"output {out} would replace what the export reads ({read}): name another directory")
    check_output(out, bool(cfg.overwrite))
    hold_output(out)  # inside the run: the run's lock (refused while frod train holds it); else the output's
    return out


@register_verb("export", config="export",
               summary="a run for serving:  frod export path=<run dir> format=peft|lora|merged [output=<dir>]")
def run(cfg: Any) -> Dict[str, Any]:
    from frod_cli.training import builders as B

    B.quiet_libraries()
    check_options(cfg)
    src = resolve_source(str(cfg.path), cfg.format)
    check_method(cfg.format, src.run)
    out = resolve_output(cfg, src)
    created = missing_dirs(os.path.dirname(os.path.abspath(out)))  # a refused or failed export removes them
    try:
        report = dispatch(cfg, src, out)
    except BaseException:
        remove_if_empty(created)
        raise
    print(f"wrote {out} (export.json: what was measured)")
    return report


def dispatch(cfg: Any, src: Source, out: str) -> Dict[str, Any]:
    from frod_cli.export import pipelines

    job = pipelines.Job(src.run_dir, src.run, src.kind, out, int(cfg.check_batch_size), bool(cfg.cpu))
    if cfg.format == "peft" and src.run.method.name != "frod":
        return pipelines.copy_peft_adapter(job)
    if cfg.format == "peft":
        return pipelines.export_peft(job, DEFAULT_TOLERANCE if cfg.tolerance is None else float(cfg.tolerance))
    if cfg.format == "lora":
        return pipelines.export_lora(job, cfg.rank, cfg.energy)
    return pipelines.export_merged(job, cfg.dtype or src.run.model.dtype)
