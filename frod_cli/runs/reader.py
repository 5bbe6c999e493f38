"""The one reader of run directories (what `frod train` writes), used by report, compare, eval and merge.

    <run>/.hydra/config.yaml     the composed config          read_config / load_run_config
    <run>/.hydra/overrides.yaml  the command-line overrides   read_overrides
    <run>/metrics.jsonl          log lines and evaluations    read_log, loss_series
    <run>/metrics.json           the final metrics            read_metrics
    <run>/adapter/ <run>/merged/ the best checkpoint          paths in RunPaths
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from frod_cli import FrodCliError
from frod_cli.runs.io import read_jsonl

log = logging.getLogger("frod.runs")
CHECKPOINTS = "checkpoints"  # <run>/checkpoints/step-<N>/, complete once its state.json exists
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
PathLike = Union[str, Path]
SEED_KEYS = ("train.seed", "seed")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: PathLike) -> "RunPaths":
        return cls(Path(run_dir))

    config = property(lambda self: self.root / ".hydra" / "config.yaml")
    overrides = property(lambda self: self.root / ".hydra" / "overrides.yaml")
    log = property(lambda self: self.root / "metrics.jsonl")
    metrics = property(lambda self: self.root / "metrics.json")
    predictions = property(lambda self: self.root / "predictions.jsonl")
    adapter = property(lambda self: self.root / "adapter")
    merged = property(lambda self: self.root / "merged")
    loss_png = property(lambda self: self.root / "loss.png")


def step_dirs(run_dir: PathLike) -> List[Tuple[int, str]]:
    """The complete checkpoints of a run, newest first: (step, directory)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out, reverse=True)


def latest_checkpoint(run_dir: PathLike) -> Optional[str]:
    dirs = step_dirs(run_dir)
    return dirs[0][1] if dirs else None


def is_run_dir(path: PathLike) -> bool:
    return RunPaths.of(path).config.is_file()


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged .hydra file only loses the labels
        return None


def read_config(run_dir: PathLike) -> Dict[str, Any]:
    """The composed config as plain containers ({} when missing or damaged)."""
    cfg = _load_yaml(RunPaths.of(run_dir).config)
    return cfg if isinstance(cfg, dict) else {}


def read_overrides(run_dir: PathLike) -> List[str]:
    """The run's command-line overrides, without Hydra's own."""
    ov = _load_yaml(RunPaths.of(run_dir).overrides) or []
    return [str(o) for o in ov if not str(o).startswith("hydra.")]


def read_metrics(run_dir: PathLike) -> Optional[Dict[str, Any]]:
    f = RunPaths.of(run_dir).metrics
    if not f.is_file():
        return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def read_log(run_dir: PathLike) -> List[Dict[str, Any]]:
    return read_jsonl(str(RunPaths.of(run_dir).log))


def training_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of a metrics.jsonl that a training step wrote (an evaluation's rows name their split)."""
    return [r for r in rows if "split" not in r and "step" in r]


def loss_series(jsonl_path: PathLike) -> Tuple[List[Tuple[int, float]], List[Dict[str, Any]]]:
    """(training loss as sorted (step, loss), validation evaluation lines) of a metrics.jsonl."""
    rows = read_jsonl(str(jsonl_path))
    train = sorted((int(r["step"]), float(r["loss"])) for r in training_rows(rows) if r.get("loss") is not None)
    val = [r for r in rows if r.get("split") == "validation"]
    return train, val


def find_runs(sweep_dir: PathLike) -> List[Path]:
    """Every finished run directory (holding metrics.json) under `sweep_dir`, in job order."""
    root = Path(sweep_dir)
    dirs = {p.parent for p in root.rglob("metrics.json") if "merged" not in p.parts and "adapter" not in p.parts}
    return sorted(dirs, key=lambda p: (len(p.parts), [int(x) if x.isdigit() else x for x in p.parts]))


def read_run(run_dir: PathLike) -> Dict[str, Any]:
    """One finished run for reports: final metrics, training-loss series, seed, method, overrides."""
    run_dir = Path(run_dir)
    final = read_metrics(run_dir) or {}
    cfg = read_config(run_dir)
    overrides = read_overrides(run_dir)
    seed = (cfg.get("train") or {}).get("seed")
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k in SEED_KEYS:
            seed = v
    method = final.get("method") or (cfg.get("method") or {}).get("name") or "?"
    loss, _ = loss_series(RunPaths.of(run_dir).log)
    return {"dir": str(run_dir), "final": final, "loss": loss, "seed": seed, "method": str(method),
            "overrides": overrides}


def typed_task(task: Any, run_dir: PathLike) -> Any:
    """A saved task config as its type's schema (frod_cli/tasks/) holds it: defaults for the keys it lacks, the keys
    that are not its type's dropped."""
    from omegaconf import OmegaConf

    from frod_cli.tasks import get_task

    task = dict(task or {})
    try:
        cls = get_task(str(task.get("type"))).config_class
    except ValueError as e:
        raise FrodCliError(f"run {run_dir}: {e}") from None
    known = set(cls.__dataclass_fields__)
    if set(task) - known:  # a run of an older frod, whose task config held every type's keys
        log.debug("run %s: task keys %s are not keys of task type %s; dropped", run_dir, sorted(set(task) - known),
                  task.get("type"))
    return OmegaConf.merge(OmegaConf.structured(cls(type=str(task["type"]))), {k: v for k, v in task.items() if k in known})


def load_run_config(run_dir: PathLike) -> Any:
    """The config a run trained with: its composed config, typed by the FrodRunConfig schema, its method's own
    config and its task type's, with the recipe's per_method settings applied as training applied them.
    Keys a saved method or task config holds that its schema no longer has (runs of older versions: their task
    config held every task type's keys) are dropped."""
    from omegaconf import OmegaConf

    from frod_cli.config import FrodRunConfig
    from frod_cli.methods import get_method

    if not is_run_dir(run_dir):
        raise FrodCliError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
    raw = read_config(run_dir)
    if not raw:
        raise FrodCliError(f"{RunPaths.of(run_dir).config} is damaged (not a YAML mapping)")
    method = dict(raw.get("method") or {})
    cls = get_method(str(method.get("name")))
    known = set(cls.config_class.__dataclass_fields__)
    dropped = sorted(set(method) - known)
    if dropped:
        log.info("run %s: method keys %s are not keys of method %s; ignored", run_dir, dropped, method.get("name"))
    raw["method"] = {k: v for k, v in method.items() if k in known}
    raw["task"] = typed_task(raw.get("task"), run_dir)
    schema = OmegaConf.structured(FrodRunConfig)
    schema.method = OmegaConf.structured(cls.config_class(name=method["name"]))
    cfg = OmegaConf.merge(schema, raw)
    from frod_cli.config import apply_per_method

    apply_per_method(cfg, read_overrides(run_dir))  # .hydra/ holds the config as composed, before them
    return cfg
