"""`frod merge run=<run dir>`: rebuild merged/ from the run's adapter and its base model, and
report the largest output difference between the merged and the unmerged model on a batch."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

import torch

from frod_cli import FrodCliError
from frod_cli.report import atomic_write_json

log = logging.getLogger("frod.merge")


def run_merge(cfg: Any) -> Dict[str, Any]:
    from accelerate.utils import set_seed

    from frod_cli.eval import is_run_dir, load_run_config
    from frod_cli.methods import build_method
    from frod_cli.train import _quiet_libraries, build_task, load_model, make_loader, merge_and_check, save_merged

    _quiet_libraries()

    run_dir = os.path.abspath(cfg.run)
    if not is_run_dir(run_dir):
        raise FrodCliError(f"{cfg.run} is not a run directory (no .hydra/config.yaml)")
    adapter = os.path.join(run_dir, "adapter")
    if not os.path.isdir(adapter):
        raise FrodCliError(f"{cfg.run} has no adapter/ to merge")
    run = load_run_config(run_dir)
    seed = int(run.train.seed)
    task = build_task(run.task, seed)
    data = task.load_data()
    set_seed(seed)
    base, pre = load_model(run.model, task)
    method = build_method(run.method, task, run.model)
    model = method.load_adapter(base, adapter)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model.to(device)

    split = "validation" if "validation" in data else next(iter(data))
    encoded = task.encode(data, pre)
    batch = next(iter(make_loader(encoded[split], int(cfg.check_batch_size), task.collate(pre), False, 0)))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    merged, diff = merge_and_check(method, model, batch, task)
    out = os.path.abspath(cfg.output or os.path.join(run_dir, "merged"))
    save_merged(merged, pre, out)
    report = {"run": run_dir, "method": run.method.name, "output": out, "max_abs_diff": diff,
              "check_examples": int(batch[next(iter(batch))].shape[0]), "check_split": split}
    atomic_write_json(os.path.join(run_dir, "merge.json"), report)
    print(f"merged {run.method.name} adapter into {run.model.name_or_path} -> {out}")
    print(f"largest |merged - unmerged| output difference on {report['check_examples']} {split} examples: {diff:.3e}")
    return report
