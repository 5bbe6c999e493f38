"""The training loop (Accelerate). It knows nothing about FRoD: the method gives it parameter groups
and saves/merges; the task gives it data, loss, predictions and metrics.

Run directory (written by the main process only, each file atomically):
  .hydra/         the composed config (Hydra)
  metrics.jsonl   one line per log step (step, loss, lr, throughput, memory) and per evaluation
  metrics.json    final metrics of the best checkpoint (validation, test), trainable params, wall time
  adapter/        the best checkpoint's adapter (method.save_adapter)
  merged/         a plain transformers model + preprocessor (AutoModelFor...from_pretrained)
  loss.png        the loss curve
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from frod_cli import FrodCliError
from frod_cli.report import (
    JsonlWriter,
    atomic_dir,
    atomic_write_json,
    plot_loss_curve,
)

log = logging.getLogger("frod.train")

SCHEDULERS = ("constant", "linear", "cosine")


# ---------------------------------------------------------------------------------------------
# Building blocks shared with eval.py and merge.py
# ---------------------------------------------------------------------------------------------
def build_task(task_cfg: Any, seed: int):
    from frod_cli.tasks import get_task

    return get_task(task_cfg.type)(task_cfg, seed)


def load_model(model_cfg: Any, task: Any):
    from frod_cli.models import load_model as _load

    return _load(model_cfg, task)


def make_loader(dataset, batch_size: int, collate, shuffle: bool, seed: int, num_workers: int = 0):
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        num_workers=num_workers,
        generator=g if shuffle else None,
    )


def evaluate_split(model, loader, task, accelerator) -> Tuple[Dict[str, float], Any]:
    """Metrics of one split, gathered over processes. Returns (metrics, references)."""
    was_training = model.training
    model.eval()
    preds: List[torch.Tensor] = []
    refs: List[torch.Tensor] = []
    with torch.no_grad():
        for batch in loader:
            p, r = task.predict(model, batch)
            p, r = accelerator.gather_for_metrics((p.contiguous(), r.contiguous()))
            preds.append(p.detach().float().cpu() if p.is_floating_point() else p.detach().cpu())
            refs.append(r.detach().float().cpu() if r.is_floating_point() else r.detach().cpu())
    if was_training:
        model.train()
    if not preds:
        raise FrodCliError("an evaluation split is empty")
    P = torch.cat(preds).numpy()
    R = torch.cat(refs).numpy()
    metrics = {k: float(v) for k, v in task.compute_metrics(P, R).items()}
    return metrics, R


def majority_accuracy(refs) -> Optional[float]:
    try:
        t = torch.as_tensor(refs)
        if t.is_floating_point() or t.dim() != 1 or t.numel() == 0:
            return None
        return float(torch.bincount(t.long()).max().item() / t.numel())
    except Exception:  # noqa: BLE001 - a nicety, never fatal
        return None


def build_optimizer(opt_cfg: Any, groups: Dict[str, List[torch.nn.Parameter]]):
    known = set(groups)
    unknown = set(opt_cfg.group_lr or {}) - known
    if unknown:
        log.info(
            "optimizer.group_lr keys %s do not name a parameter group of this method (groups: %s); "
            "they are ignored",
            sorted(unknown),
            sorted(known),
        )
    param_groups = []
    for name, params in groups.items():
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        lr = float((opt_cfg.group_lr or {}).get(name, opt_cfg.lr))
        param_groups.append({"params": params, "lr": lr, "name": name})
    if not param_groups:
        raise FrodCliError("the method left no trainable parameter")
    if opt_cfg.name == "adamw":
        return torch.optim.AdamW(
            param_groups,
            lr=float(opt_cfg.lr),
            betas=tuple(float(b) for b in opt_cfg.betas),
            eps=float(opt_cfg.eps),
            weight_decay=float(opt_cfg.weight_decay),
        )
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=float(opt_cfg.lr), momentum=0.9, weight_decay=float(opt_cfg.weight_decay))
    raise FrodCliError(f"unknown optimizer.name {opt_cfg.name!r}; available: adamw, sgd")


def build_scheduler(optimizer, opt_cfg: Any, total_steps: int):
    from transformers import get_scheduler

    if opt_cfg.scheduler not in SCHEDULERS:
        raise FrodCliError(f"unknown optimizer.scheduler {opt_cfg.scheduler!r}; available: {', '.join(SCHEDULERS)}")
    warmup = int(opt_cfg.warmup_steps) or int(math.ceil(float(opt_cfg.warmup_ratio) * total_steps))
    name = "constant_with_warmup" if opt_cfg.scheduler == "constant" else opt_cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps), warmup


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


def better(value: float, best: Optional[float], mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def model_outputs(model, batch, task=None) -> torch.Tensor:
    """The logits (or first output) of a model on a batch, in float32."""
    if task is not None and hasattr(task, "model_inputs"):
        batch = task.model_inputs(model, batch)
    out = model(**batch)
    t = getattr(out, "logits", None)
    if t is None:
        t = out[0] if isinstance(out, (tuple, list)) else out
    return t.float()


def save_merged(merged_model, preprocessor, directory: str) -> None:
    def write(tmp: str) -> None:
        merged_model.save_pretrained(tmp)
        if preprocessor is not None and hasattr(preprocessor, "save_pretrained"):
            preprocessor.save_pretrained(tmp)

    atomic_dir(directory, write)


def merge_and_check(method, model, batch, task=None) -> Tuple[Any, float]:
    """Merge the adaptation; return (plain model, largest |merged - unmerged| output on `batch`)."""
    model.eval()
    with torch.no_grad():
        before = model_outputs(model, batch, task)
    merged = method.merge(model)
    merged.eval()
    with torch.no_grad():
        after = model_outputs(merged, batch, task)
    return merged, float((after - before).abs().max().item())


def _resolve_cfg(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    if cfg.optimizer.scheduler not in SCHEDULERS:
        raise FrodCliError(f"unknown optimizer.scheduler {cfg.optimizer.scheduler!r}; available: {', '.join(SCHEDULERS)}")
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise FrodCliError(f"train.mixed_precision must be no, bf16 or fp16, got {cfg.train.mixed_precision!r}")
    if cfg.task.objective_mode not in ("max", "min"):
        raise FrodCliError(f"task.objective_mode must be max or min, got {cfg.task.objective_mode!r}")
    if cfg.resume:
        raise FrodCliError("resume is not supported yet: start a new run")
    OmegaConf.resolve(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train(cfg: Any, output_dir: Optional[str] = None) -> float:
    """Train one recipe; write the run directory; return the validation objective of the best
    checkpoint (what the Optuna sweeper optimizes)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed

    t_start = time.time()
    cfg = _resolve_cfg(cfg)
    _quiet_libraries()
    tc = cfg.train
    mixed = tc.mixed_precision
    if mixed != "no" and (tc.cpu or not torch.cuda.is_available()):
        log.info("mixed_precision=%s needs a GPU; training in float32", mixed)
        mixed = "no"
    acc = Accelerator(gradient_accumulation_steps=int(tc.grad_accum), mixed_precision=mixed, cpu=bool(tc.cpu))
    main = acc.is_main_process

    # One output directory for all processes: the main process's.
    out = [output_dir or cfg.output_dir]
    if acc.num_processes > 1:
        broadcast_object_list(out)
    output_dir = out[0]
    if output_dir is None:
        raise FrodCliError("no output directory (run through `frod train` or set output_dir=...)")
    if main:
        os.makedirs(output_dir, exist_ok=True)
    jsonl = JsonlWriter(os.path.join(output_dir, "metrics.jsonl")) if main else None

    set_seed(int(tc.seed))
    task = build_task(cfg.task, int(tc.seed))
    data = task.load_data()
    for split in ("train", "validation"):
        if split not in data:
            raise FrodCliError(f"task {cfg.task.name}: no {split!r} split")
    set_seed(int(tc.seed))  # models built from a config (tiny:*) get the same init in eval/merge
    model, preprocessor = load_model(cfg.model, task)

    from frod_cli.methods import build_method

    method = build_method(cfg.method, task, cfg.model)
    t_adapt = time.time()
    model = method.adapt(model)
    adapt_s = time.time() - t_adapt
    counts = method.trainable_summary(model)
    groups = method.param_groups(model)
    optimizer = build_optimizer(cfg.optimizer, groups)
    if main:
        log.info(
            "%s on %s with %s: %s trainable of %s (%.3f%%); groups %s; adapt %.1fs",
            cfg.model.name_or_path, cfg.task.name, cfg.method.name,
            f"{counts['trainable_params']:,}", f"{counts['total_params']:,}", counts["trainable_percent"],
            {k: sum(p.numel() for p in v) for k, v in groups.items()}, adapt_s,
        )

    with acc.main_process_first():
        encoded = task.encode(data, preprocessor)
    collate = task.collate(preprocessor)
    train_loader = make_loader(encoded["train"], int(tc.batch_size), collate, True, int(tc.seed), int(tc.num_workers))
    val_loader = make_loader(encoded["validation"], int(tc.eval_batch_size), collate, False, 0, int(tc.num_workers))
    has_test = "test" in encoded and bool(tc.eval_test)
    test_loader = make_loader(encoded["test"], int(tc.eval_batch_size), collate, False, 0, int(tc.num_workers)) if has_test else None

    model, optimizer, train_loader, val_loader = acc.prepare(model, optimizer, train_loader, val_loader)
    if test_loader is not None:
        test_loader = acc.prepare(test_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / int(tc.grad_accum)))
    total_steps = int(tc.max_steps) if int(tc.max_steps) > 0 else max(1, math.ceil(float(tc.epochs) * steps_per_epoch))
    scheduler, warmup = build_scheduler(optimizer, cfg.optimizer, total_steps)
    eval_every = int(tc.eval_every) if int(tc.eval_every) > 0 else steps_per_epoch
    samples_per_step = int(tc.batch_size) * int(tc.grad_accum) * acc.num_processes
    objective, mode = cfg.task.objective, cfg.task.objective_mode

    unwrapped = acc.unwrap_model(model)
    trainable_names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    best: Optional[float] = None
    best_step = 0
    best_val: Dict[str, float] = {}
    best_state: Optional[Dict[str, torch.Tensor]] = None
    bad_evals = 0
    adapter_dir = os.path.join(output_dir, "adapter")

    def snapshot() -> Dict[str, torch.Tensor]:
        params = dict(unwrapped.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in trainable_names}

    def do_eval(step: int) -> bool:
        """Evaluate on validation; keep the best checkpoint. True = stop early."""
        nonlocal best, best_step, best_val, best_state, bad_evals
        metrics, _ = evaluate_split(model, val_loader, task, acc)
        if objective not in metrics:
            raise FrodCliError(f"task.objective {objective!r} is not among the metrics {sorted(metrics)}")
        value = metrics[objective]
        improved = better(value, best, mode)
        if improved:
            best, best_step, best_val, bad_evals = value, step, metrics, 0
            best_state = snapshot()
            if main and tc.save_adapter:
                atomic_dir(adapter_dir, lambda d: method.save_adapter(acc.unwrap_model(model), d))
        else:
            bad_evals += 1
        if main:
            jsonl.write({"step": step, "split": "validation", **metrics, "best": improved})
            log.info("step %d validation %s%s", step, _fmt(metrics), " (best)" if improved else "")
        patience = int(tc.early_stopping_patience)
        return patience > 0 and bad_evals >= patience

    progress = _progress(main and bool(tc.progress))
    ptask = progress.add_task(f"{cfg.recipe_name} [{cfg.method.name}]", total=total_steps, loss="-", lr="-", sps="-") if progress else None

    model.train()
    step = 0
    epoch = 0
    window_loss = torch.zeros(2, device=acc.device)  # sum, count
    t_window = time.time()
    steps_window = 0
    t_train = time.time()
    stop = False
    last_eval_step = -1
    try:
        if progress:
            progress.start()
        while step < total_steps and not stop:
            for batch in train_loader:
                with acc.accumulate(model):
                    loss = task.loss(model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and float(cfg.optimizer.max_grad_norm) > 0:
                        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(cfg.optimizer.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += torch.stack([loss.detach().float(), torch.ones((), device=acc.device)])
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                steps_window += 1
                if step % int(tc.log_every) == 0 or step == total_steps:
                    tot = acc.reduce(window_loss, reduction="sum")
                    mean_loss = float(tot[0] / tot[1].clamp(min=1))
                    dt = max(time.time() - t_window, 1e-9)
                    sps = steps_window * samples_per_step / dt
                    elapsed = time.time() - t_train
                    eta = elapsed / step * (total_steps - step)
                    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                    if main:
                        jsonl.write({
                            "step": step, "epoch": round(epoch + (step - epoch * steps_per_epoch) / steps_per_epoch, 4),
                            "loss": mean_loss, "lr": lrs, "samples_per_s": sps,
                            "elapsed_s": elapsed, "eta_s": eta, "memory_mb": memory_mb(acc.device),
                        })
                    if progress:
                        first_lr = next(iter(lrs.values()))
                        progress.update(ptask, loss=f"{mean_loss:.4f}", lr=f"{first_lr:.2e}", sps=f"{sps:.0f}")
                    window_loss.zero_()
                    t_window = time.time()
                    steps_window = 0
                if progress:
                    progress.update(ptask, completed=step)
                if step % eval_every == 0 or step == total_steps:
                    last_eval_step = step
                    if do_eval(step):
                        if main:
                            log.info("early stopping at step %d (patience %d)", step, tc.early_stopping_patience)
                        stop = True
                if stop or step >= total_steps:
                    break
            epoch += 1
    finally:
        if progress:
            progress.stop()
    train_s = time.time() - t_train
    if last_eval_step != step:
        do_eval(step)

    # The best checkpoint, on validation and test.
    with torch.no_grad():
        params = dict(unwrapped.named_parameters())
        for n, t in (best_state or {}).items():
            params[n].copy_(t.to(params[n].device))
    results: Dict[str, Any] = {"validation": best_val}
    test_majority = None
    if test_loader is not None:
        results["test"], test_refs = evaluate_split(model, test_loader, task, acc)
        test_majority = majority_accuracy(test_refs)

    # merged/: the plain model, checked against the adapted model on one validation batch.
    merge_diff = None
    if main and tc.save_merged:
        batch = next(iter(make_loader(encoded["validation"], min(8, int(tc.eval_batch_size)), collate, False, 0)))
        plain = acc.unwrap_model(model, keep_fp32_wrapper=False)
        batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        merged, merge_diff = merge_and_check(method, plain, batch, task)
        save_merged(merged, preprocessor, os.path.join(output_dir, "merged"))

    wall = time.time() - t_start
    final = {
        "recipe": cfg.recipe_name,
        "model": cfg.model.name_or_path,
        "task": cfg.task.name,
        "method": cfg.method.name,
        "objective": objective,
        "objective_mode": mode,
        "objective_value": best,
        "best_step": best_step,
        **results,
        **counts,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 4),
        "samples_per_s": step * samples_per_step / max(train_s, 1e-9),
        "train_time_s": train_s,
        "adapt_time_s": adapt_s,
        "wall_time_s": wall,
        "peak_memory_mb": memory_mb(acc.device),
        "merge_max_abs_diff": merge_diff,
        "test_majority_class_accuracy": test_majority,
        "num_processes": acc.num_processes,
        "mixed_precision": mixed,
    }
    if main:
        jsonl.close()
        atomic_write_json(os.path.join(output_dir, "metrics.json"), final)
        plot_loss_curve(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "loss.png"),
                        title=f"{cfg.recipe_name}: {cfg.method.name} on {cfg.task.name}")
        _print_final(final, output_dir)
    acc.wait_for_everyone()
    acc.end_training()
    return float(best) if best is not None else float("nan")


def _quiet_libraries() -> None:
    """The loop has its own progress bar: silence the libraries' per-map/per-shard bars."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _fmt(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[sps]} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=False,
    )


def _print_final(final: Dict[str, Any], output_dir: str) -> None:
    from rich.console import Console

    c = Console()
    obj = final["objective"]
    c.print(f"[bold]run[/bold] {output_dir}")
    for split in ("validation", "test"):
        if split in final:
            c.print(f"  {split:<10} {_fmt(final[split])}")
    if final.get("test_majority_class_accuracy") is not None:
        c.print(f"  majority-class accuracy (test): {final['test_majority_class_accuracy']:.4f}")
    c.print(
        f"  best {obj} {final['objective_value']:.4f} at step {final['best_step']}; "
        f"trainable {final['trainable_params']:,} ({final['trainable_percent']:.3f}%); "
        f"{final['wall_time_s']:.0f}s"
    )
