"""`frod eval path=<run dir | checkpoint> [task=...]`: the metrics the end of training reports,
for a run (its merged/ model, or base model + adapter/) or any saved checkpoint."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from frod_cli import FrodCliError
from frod_cli.report import atomic_write_json

log = logging.getLogger("frod.eval")


def load_run_config(run_dir: str) -> Any:
    """The composed config of a run (its .hydra/config.yaml), typed by the FrodRunConfig schema."""
    from omegaconf import OmegaConf

    from frod_cli.config import FrodRunConfig

    f = Path(run_dir) / ".hydra" / "config.yaml"
    if not f.is_file():
        raise FrodCliError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
    schema = OmegaConf.structured(FrodRunConfig)
    return OmegaConf.merge(schema, OmegaConf.load(f))


def is_run_dir(path: str) -> bool:
    return (Path(path) / ".hydra" / "config.yaml").is_file()


def load_for_eval(cfg: Any) -> Tuple[Any, Any, Any, Any, str]:
    """(model, preprocessor, task, raw data, description) for an EvalRunConfig."""
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf

    from frod_cli.config import ModelConfig
    from frod_cli.methods import build_method
    from frod_cli.train import build_task, load_model

    path = os.path.abspath(cfg.path)
    if not os.path.exists(path):
        raise FrodCliError(f"no such run directory or checkpoint: {cfg.path}")
    if is_run_dir(path):
        run = load_run_config(path)
        task_cfg = cfg.task if cfg.task is not None else run.task
        seed = int(cfg.seed if cfg.seed is not None else run.train.seed)
        task = build_task(task_cfg, seed)
        data = task.load_data()
        from frod_cli.report import recover_atomic_dir

        for name in ("adapter", "merged"):
            recover_atomic_dir(os.path.join(path, name))
        merged = os.path.join(path, "merged")
        if cfg.use_adapter or not os.path.isdir(merged):
            adapter = os.path.join(path, "adapter")
            if not os.path.isdir(adapter):
                raise FrodCliError(f"{cfg.path} has neither merged/ nor adapter/")
            set_seed(seed)
            base, pre = load_model(run.model, task)
            method = build_method(run.method, task, run.model)
            model = method.load_adapter(base, adapter)
            what = f"{run.model.name_or_path} + {run.method.name} adapter"
        else:
            mcfg = OmegaConf.structured(ModelConfig(name_or_path=merged, dtype=run.model.dtype))
            model, pre = load_model(mcfg, task)
            what = "merged/"
    else:
        if cfg.task is None:
            raise FrodCliError(f"{cfg.path} is a checkpoint, not a run directory: name its task (task=<name>)")
        seed = int(cfg.seed if cfg.seed is not None else 42)
        task = build_task(cfg.task, seed)
        data = task.load_data()
        mcfg = OmegaConf.structured(ModelConfig(name_or_path=path))
        model, pre = load_model(mcfg, task)
        what = path
    return model, pre, task, data, what


def run_eval(cfg: Any) -> Dict[str, Any]:
    from accelerate import Accelerator

    from frod_cli.train import _quiet_libraries, evaluate_split, majority_accuracy, make_loader

    _quiet_libraries()

    model, pre, task, data, what = load_for_eval(cfg)
    acc = Accelerator(cpu=bool(cfg.cpu))
    encoded = task.encode(data, pre)
    collate = task.collate(pre)
    model = acc.prepare(model)
    results: Dict[str, Any] = {"path": os.path.abspath(cfg.path), "model": what, "task": task.cfg.name}
    for split in cfg.splits:
        if split not in encoded:
            raise FrodCliError(f"task {task.cfg.name} has no {split!r} split (has {', '.join(encoded)})")
        loader = acc.prepare(make_loader(encoded[split], int(cfg.batch_size), collate, False, 0))
        metrics, refs = evaluate_split(model, loader, task, acc)
        results[split] = metrics
        maj = majority_accuracy(refs)
        if maj is not None:
            results[f"{split}_majority_class_accuracy"] = maj
    out = cfg.output or os.path.join(os.path.abspath(cfg.path), "eval.json")
    if acc.is_main_process:
        atomic_write_json(out, results)
        for split in cfg.splits:
            print(f"{split:<10} " + ", ".join(f"{k}={v:.4f}" for k, v in results[split].items()))
        print(f"wrote {out}")
    return results
