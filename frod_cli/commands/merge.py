"""`frod merge run=<run dir>`: rebuild merged/ from the run's adapter and its base model, and report the
largest output difference between the merged and the unmerged model on a batch.

`base=<model>` folds the trained update into another copy of the base instead, typically the unquantized
original of a 4-bit base (what QLoRA users ship): the same dW (for FRoD, built on the 4-bit base it trained on),
and the report gives how far that model's outputs are from the trained (4-bit) model's."""
from __future__ import annotations

import os
from typing import Any, Dict

from frod_cli import FrodCliError
from frod_cli.commands import register_verb


@register_verb("merge", config="merge", summary="adapter + base model -> merged/:  frod merge run=<run dir>")
def run(cfg: Any) -> Dict[str, Any]:
    import torch

    from frod_cli.runs import RunPaths, atomic_write_json, is_run_dir
    from frod_cli.runs.directory import check_output
    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import check_batch, merge_and_check, save_merged

    B.quiet_libraries()
    run_dir = os.path.abspath(cfg.run)
    if not is_run_dir(run_dir):
        raise FrodCliError(f"{cfg.run} is not a run directory (no .hydra/config.yaml)")
    if not RunPaths.of(run_dir).adapter.is_dir():
        raise FrodCliError(f"{cfg.run} has no adapter/ to merge")
    if int(cfg.check_batch_size) < 1:
        raise FrodCliError(f"check_batch_size must be at least 1, got {cfg.check_batch_size}")
    own = RunPaths.of(run_dir).merged
    out = os.path.abspath(cfg.output or own)
    check_output(out, bool(cfg.overwrite))
    report_file = os.path.join(run_dir if out == str(own) else out, "merge.json")
    t = B.load_trained(run_dir, use_adapter=True)
    model, pre, task, data, run, method = t.model, t.preprocessor, t.task, t.data, t.run, t.method
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model.to(device)
    split = "validation" if "validation" in data else next(iter(data))
    encoded = B.encode_data(task, data, pre)
    batch = check_batch(encoded[split], task.collate(pre), int(cfg.check_batch_size), device)
    if cfg.base:
        merged, diff = merge_into_base(method, model, batch, task, str(cfg.base), run)
    else:
        merged, diff = merge_and_check(method, model, batch, task)
    save_merged(merged, pre, out)
    report = {"run": run_dir, "method": run.method.name, "output": out, "max_abs_diff": diff,
              "check_examples": int(batch[next(iter(batch))].shape[0]), "check_split": split}
    if cfg.base:
        report["base"] = str(cfg.base)
    atomic_write_json(report_file, report)
    into = cfg.base or run.model.name_or_path
    print(f"merged {run.method.name} adapter into {into} -> {out}")
    what = "merged - trained" if cfg.base else "merged - unmerged"
    print(f"largest |{what}| output difference on {report['check_examples']} {split} examples: {diff:.3e}")
    return report


def merge_into_base(method: Any, model: Any, batch: Dict[str, Any], task: Any, base: str, run: Any):
    """(the trained update folded into `base`, loaded unquantized in the run's dtype; the largest difference
    between its outputs and the trained model's on `batch`)."""
    import torch
    from omegaconf import OmegaConf

    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import model_outputs

    model.eval()
    with torch.no_grad():
        trained = model_outputs(model, batch, task)
    mcfg = OmegaConf.merge(run.model, {"name_or_path": base, "quantization": "none"})
    other, _ = B.load_base(mcfg, task, int(run.train.seed))
    merged = method.merge_into(model, other.to(trained.device)).eval()
    with torch.no_grad():
        after = model_outputs(merged, batch, task)
    if after.shape != trained.shape:
        raise FrodCliError(f"base={base} gives outputs of shape {tuple(after.shape)}, the run's model "
                           f"{tuple(trained.shape)}: not the same model")
    return merged, float((after - trained).abs().max().item())
