"""Weighted mixtures of data sources (`task.mixture`).

Each entry names one source with the keys a single source has (`source`, `dataset`, `subset`, `data_files`,
`format`, the layout and its field names, split names and fractions, sample caps, `dedupe`, `system_prompt`)
plus `name` (default: the dataset id, the offline source's name or the train file's stem) and `weight`
(default 1). A source's data keys (`source`, `dataset`, `subset`, `data_files`, `format`) are its own (`source`
defaults to local when it gives data_files, else hub), and so is its layout (`data_format`, default auto: picked
from its columns); everything else (field names, splits, system prompt, ...) is inherited from the task.

Training draws each example from source i with probability weight_i / sum(weights), seeded by train.seed (the
same run twice sees the same order), through datasets' `interleave_datasets`; `task.mixture_stop` names when the
mixture's epoch ends: `first_exhausted` (when the first source runs out: no example is repeated, the larger
sources are under-sampled) or `all_exhausted` (when the last one runs out: the smaller sources repeat). Every
source keeps its own validation and test splits; evaluation reports each source's metrics as `<name>/<metric>`
and the overall metrics (all sources' examples together) under the plain names, which task.objective reads.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

from omegaconf import OmegaConf, open_dict

from frod_cli import FrodCliError

STOPS = ("first_exhausted", "all_exhausted")
DATA_KEYS = ("source", "dataset", "subset", "data_files", "format")
SOURCE_KEYS = DATA_KEYS + (
    "data_format", "text_fields", "instruction_field", "input_field", "output_field", "messages_field",
    "conversations_field", "role_map", "tools_field", "prompt_field", "completion_field", "prompt_template", "response_template",
    "system_prompt", "train_split", "validation_split", "test_split", "validation_fraction", "test_fraction",
    "max_train_samples", "max_eval_samples", "dedupe", "skip_malformed")


@dataclass
class Source:
    name: str
    weight: float
    cfg: Any  # a TaskConfig node: the task's settings with the source's own keys over them


def default_name(cfg: Any) -> str:
    """The dataset id (hub), the offline source's name, or the stem of the train file (local)."""
    if cfg.source == "local":
        files = dict(cfg.data_files or {})
        path = files.get(cfg.train_split) or next(iter(files.values()), None)
        return Path(str(path)).stem if path else "local"
    return str(cfg.dataset or cfg.name)


def sources_of(cfg: Any) -> List[Source]:
    """The task's sources: its mixture's entries, or the task itself as the one source (task types without a
    `mixture` key read one source)."""
    if not cfg.get("mixture"):
        return [Source(default_name(cfg), 1.0, cfg)]
    if cfg.mixture_stop not in STOPS:
        raise FrodCliError(f"unknown task.mixture_stop {cfg.mixture_stop!r}; use {' or '.join(STOPS)}")
    if getattr(cfg, "test_dataset", None):
        raise FrodCliError("task.test_dataset with task.mixture: give each source its own test split instead")
    out = [_entry(cfg, i, entry) for i, entry in enumerate(cfg.mixture)]
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FrodCliError(f"task.mixture names {dupes[0]!r} twice: give each source its own name")
    return out


def _entry(cfg: Any, i: int, entry: Any) -> Source:
    where = f"task.mixture[{i}]"
    if not OmegaConf.is_dict(entry) and not isinstance(entry, dict):
        raise FrodCliError(f"{where} is {entry!r}, not a source ({{name, weight, data_files or dataset, ...}})")
    entry = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else dict(entry)
    unknown = sorted(set(entry) - set(SOURCE_KEYS) - {"name", "weight"})
    if unknown:
        raise FrodCliError(f"{where} has key {unknown[0]!r}, not a key of one source; its keys: name, weight, "
                           f"{', '.join(SOURCE_KEYS)}")
    weight = entry.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise FrodCliError(f"{where} has weight {weight!r}: a weight is a number > 0")
    if not entry.get("dataset") and not entry.get("data_files"):
        raise FrodCliError(f"{where} (weight {weight}) names no data: give it dataset=<Hub id or offline source> "
                           "or data_files={train: <file>}")
    name = entry.pop("name", None)
    entry.setdefault("source", "local" if entry.get("data_files") else "hub")
    base = cfg.copy()  # the task's settings; the data keys are the entry's own
    base.data_files, base.mixture = {}, []
    base.dataset = base.subset = base.format = base.test_dataset = None
    base.data_format = "auto"  # a layout is a property of the data: auto unless the entry names it
    try:
        with open_dict(base):  # data_files is a dict of split names: new keys are fine
            merged = OmegaConf.merge(base, entry)
    except Exception as e:  # noqa: BLE001 - OmegaConf's validation errors: a wrong type in the entry
        raise FrodCliError(f"{where}: {str(e).splitlines()[0]}") from e
    if merged.source == "local":
        for split, path in dict(merged.data_files or {}).items():
            if not os.path.exists(str(path)):
                raise FrodCliError(f"{where}: data file for split {split!r} not found: {path}")
    return Source(str(name) if name else default_name(merged), float(weight), merged)


def probabilities(sources: List[Source]) -> List[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]
