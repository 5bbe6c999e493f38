"""`frod merge run=<run dir>`: rebuild merged/ from the run's adapter and its base model, and report the
largest output difference between the merged and the unmerged model on a batch."""
from __future__ import annotations

import os
from typing import Any, Dict

from frod_cli import FrodCliError
from frod_cli.commands import register_verb


@register_verb("merge", config="merge", summary="adapter + base model -> merged/:  frod merge run=<run dir>")
def run(cfg: Any) -> Dict[str, Any]:
    import torch

    from frod_cli.runs import RunPaths, atomic_write_json, is_run_dir
    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import check_batch, merge_and_check, save_merged

    B.quiet_libraries()
    run_dir = os.path.abspath(cfg.run)
    if not is_run_dir(run_dir):
        raise FrodCliError(f"{cfg.run} is not a run directory (no .hydra/config.yaml)")
    if not RunPaths.of(run_dir).adapter.is_dir():
        raise FrodCliError(f"{cfg.run} has no adapter/ to merge")
    t = B.load_trained(run_dir, use_adapter=True)
    model, pre, task, data, run, method = t.model, t.preprocessor, t.task, t.data, t.run, t.method
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model.to(device)
    split = "validation" if "validation" in data else next(iter(data))
    encoded = B.encode_data(task, data, pre)
    batch = check_batch(encoded[split], task.collate(pre), int(cfg.check_batch_size), device)
    merged, diff = merge_and_check(method, model, batch, task)
    out = os.path.abspath(cfg.output or RunPaths.of(run_dir).merged)
    save_merged(merged, pre, out)
    report = {"run": run_dir, "method": run.method.name, "output": out, "max_abs_diff": diff,
              "check_examples": int(batch[next(iter(batch))].shape[0]), "check_split": split}
    atomic_write_json(os.path.join(run_dir, "merge.json"), report)
    print(f"merged {run.method.name} adapter into {run.model.name_or_path} -> {out}")
    print(f"largest |merged - unmerged| output difference on {report['check_examples']} {split} examples: {diff:.3e}")
    return report
