"""`frod merge run=<run dir>`: rebuild merged/ from the run's adapter and its base model, and report the
largest output difference between the merged and the unmerged model on a batch.

`base=<model>` folds the trained update into another copy of the base instead, typically the unquantized
original of a 4-bit base (what QLoRA users ship): the same dW (for FRoD, built on the 4-bit base it trained on),
and the report gives how far that model's outputs are from the trained (4-bit) model's, next to how far the trained
model's outputs are from its own base's (the adapter switched off: the update's own size on the same outputs) and
the ratio of the two."""
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
    from frod_cli.runs.lock import hold_output
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
    hold_output(out)  # merged/ of the run: the run's lock (refused while frod train holds it); else the output's
    report_file = os.path.join(run_dir if out == str(own) else out, "merge.json")
    t = B.load_trained(run_dir, use_adapter=True)
    model, pre, task, data, run, method = t.model, t.preprocessor, t.task, t.data, t.run, t.method
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model.to(device)
    split = "validation" if "validation" in data else next(iter(data))
    encoded = B.encode_data(task, data, pre)
    batch = check_batch(encoded[split], task.collate(pre), int(cfg.check_batch_size), device)
    report = {"run": run_dir, "method": run.method.name, "output": out,
              "check_examples": int(batch[next(iter(batch))].shape[0]), "check_split": split}
    if cfg.base:
        merged, diffs = merge_into_base(method, model, batch, task, str(cfg.base), run)
        report.update(base=str(cfg.base), **diffs)
    else:
        merged, report["max_abs_diff"] = merge_and_check(method, model, batch, task)
    save_merged(merged, pre, out)
    write_merged_card(run_dir, out, base=str(cfg.base) if cfg.base else None)
    atomic_write_json(report_file, report)
    print(f"merged {run.method.name} adapter into {cfg.base or run.model.name_or_path} -> {out}")
    print(describe_check(report))
    return report


def write_merged_card(run_dir: str, out: str, base: Any = None) -> None:
    """merged/'s model card, as the run's own end writes it (a merged model must not lose its card to a re-merge);
    another output gets the same card, located there, and base= names the base the update was folded into."""
    import dataclasses

    from frod_cli.share.card import build_card, run_artifact, write_card

    artifact = dataclasses.replace(run_artifact(run_dir, "merged"), directory=out, location=out)
    card = build_card(artifact)
    if base is not None:
        card.text += (f"\n\nMerged by `frod merge base={base}`: the trained update folded into that base "
                      "(its outputs differ from the trained model's by the report's merge.json figures).\n")
    write_card(out, card)


def describe_check(report: Dict[str, Any]) -> str:
    """The merge check as one line: the largest output difference, and with base= the trained update's own size
    on the same outputs beside it (a difference is small only next to what the update changes)."""
    where = f"on {report['check_examples']} {report['check_split']} examples"
    if "base" not in report:
        return f"largest |merged - unmerged| output difference {where}: {report['max_abs_diff']:.3e}"
    ratio = "-" if report["ratio"] is None else f"{report['ratio']:.3g}"
    return (f"largest |merged - trained| output difference {where}: {report['max_abs_diff']:.3e}; the trained "
            f"update's own size, largest |trained - the run's base| on the same outputs: "
            f"{report['update_max_abs_diff']:.3e} "
            f"(ratio {ratio})")


def merge_into_base(method: Any, model: Any, batch: Dict[str, Any], task: Any, base: str, run: Any):
    """(the trained update folded into `base`, loaded unquantized in the run's dtype; on `batch`: max_abs_diff,
    the largest |merged - trained| output difference, update_max_abs_diff, the largest |trained - run's base|
    one (what the update itself changes: the run's own base, the adapter switched off), and their ratio)."""
    import torch
    from omegaconf import OmegaConf

    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import model_outputs

    model.eval()
    with torch.no_grad():
        trained = model_outputs(model, batch, task)
        with without_update(model):
            own_base = model_outputs(model, batch, task)
    mcfg = OmegaConf.merge(run.model, {"name_or_path": base, "quantization": "none"})
    other, _ = B.load_base(mcfg, task, int(run.train.seed))
    merged = method.merge_into(model, other.to(trained.device)).eval()
    with torch.no_grad():
        after = model_outputs(merged, batch, task)
    if after.shape != trained.shape:
        raise FrodCliError(f"base={base} gives outputs of shape {tuple(after.shape)}, the run's model "
                           f"{tuple(trained.shape)}: not the same model")
    diff, size = float((after - trained).abs().max()), float((trained - own_base).abs().max())
    return merged, {"max_abs_diff": diff, "update_max_abs_diff": size, "ratio": diff / size if size > 0 else None}


def without_update(model: Any) -> Any:
    """A context in which the trained model gives its base's outputs: PEFT's `disable_adapter`, or FRoD's."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    from frod_cli.frod import disable_adapter

    return disable_adapter(model)
