"""The training loop (Accelerate). It knows nothing about FRoD: the method gives it parameter groups
and saves/merges; the task gives it data, loss, predictions and metrics.

Run directory (written by the main process only, each file atomically):
  .hydra/         the composed config (Hydra)
  metrics.jsonl   one line per log step (step, loss, lr, throughput, memory) and per evaluation
  metrics.json    final metrics of the best checkpoint (validation, test), trainable params, wall time
  adapter/        the best checkpoint's adapter (method.save_adapter)
  merged/         a plain transformers model + preprocessor (AutoModelFor...from_pretrained)
  loss.png        the loss curve
  checkpoints/    step-N/: trainable values, optimizer, scheduler, RNG, data position, config
                  (frod_cli.checkpoint; for resume=<run dir>; removed at the end unless
                  train.keep_checkpoints=true). See docs/RELIABILITY.md.
"""
from __future__ import annotations

import contextlib
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
    recover_atomic_dir,
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
        lr = float((opt_cfg.group_lr or {}).get(name, opt_cfg.lr)) * float(opt_cfg.lr_scale)
        param_groups.append({"params": params, "lr": lr, "name": name})
    if not param_groups:
        raise FrodCliError("the method left no trainable parameter")
    if opt_cfg.name == "adamw":
        return torch.optim.AdamW(
            param_groups,
            lr=float(opt_cfg.lr) * float(opt_cfg.lr_scale),
            betas=tuple(float(b) for b in opt_cfg.betas),
            eps=float(opt_cfg.eps),
            weight_decay=float(opt_cfg.weight_decay),
        )
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=float(opt_cfg.lr) * float(opt_cfg.lr_scale), momentum=0.9, weight_decay=float(opt_cfg.weight_decay))
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
    """The logits (or first output) of a model on a batch, in float32; a multiple-choice task's choice
    scores (its batches are not plain model inputs)."""
    if task is not None and hasattr(task, "scores"):
        return task.scores(model, batch).float()
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
    """Refuse bad values before any work starts (one line each)."""
    from omegaconf import OmegaConf

    if cfg.optimizer.scheduler not in SCHEDULERS:
        raise FrodCliError(f"unknown optimizer.scheduler {cfg.optimizer.scheduler!r}; available: {', '.join(SCHEDULERS)}")
    if cfg.optimizer.name not in ("adamw", "sgd"):
        raise FrodCliError(f"unknown optimizer.name {cfg.optimizer.name!r}; available: adamw, sgd")
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise FrodCliError(f"train.mixed_precision must be no, bf16 or fp16, got {cfg.train.mixed_precision!r}")
    if cfg.task.objective_mode not in ("max", "min"):
        raise FrodCliError(f"task.objective_mode must be max or min, got {cfg.task.objective_mode!r}")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every"):
        if int(cfg.train[key]) < 1:
            raise FrodCliError(f"train.{key} must be a positive integer, got {cfg.train[key]}")
    for key in ("eval_every", "checkpoint_every", "num_workers", "early_stopping_patience"):
        if int(cfg.train[key]) < 0:
            raise FrodCliError(f"train.{key} must be >= 0, got {cfg.train[key]}")
    if int(cfg.train.max_steps) <= 0 and not float(cfg.train.epochs) > 0:
        raise FrodCliError(f"train.epochs must be > 0 (or set train.max_steps), got {cfg.train.epochs}")
    lr = float(cfg.optimizer.lr)
    if not (math.isfinite(lr) and lr > 0):
        raise FrodCliError(f"optimizer.lr must be a positive number, got {cfg.optimizer.lr}")
    scale = float(cfg.optimizer.lr_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise FrodCliError(f"optimizer.lr_scale must be a positive number, got {cfg.optimizer.lr_scale}")
    for name, value in (cfg.optimizer.group_lr or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(float(value)) and value > 0):
            raise FrodCliError(f"optimizer.group_lr.{name} must be a positive number, got {value!r}")
    if cfg.method.name in ("frod", "peft_frod"):
        sr = float(cfg.method.sparse_rate)
        if not 0.0 < sr < 1.0:
            raise FrodCliError(f"method.sparse_rate must lie in (0, 1), got {cfg.method.sparse_rate}")
    OmegaConf.resolve(cfg)
    return cfg


def check_output_dir(path: str) -> None:
    """An output directory that cannot be written is refused before anything else happens."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".frod-write-probe-", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise FrodCliError(f"output directory {path} is not writable ({e.strerror or e})") from None


def check_free_space(path: str, need_bytes: int) -> None:
    import shutil

    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise FrodCliError(
            f"output directory {path} has {free / 2**20:.1f} MiB free; this run needs about "
            f"{need_bytes / 2**20:.1f} MiB (checkpoints, adapter, merged model): free space or pick another output_dir"
        )


def epoch_batches(n: int, batch_size: int, num_processes: int, rank: int, seed: int, epoch: int) -> List[List[int]]:
    """This process's micro-batches of one epoch: a permutation seeded by (seed, epoch), cut into global
    batches of batch_size x num_processes; rank r takes the r-th slice of each. With one process the
    last batch may be short; with several the incomplete last global batch is dropped (equal shards)."""
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    if num_processes == 1:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    G = batch_size * num_processes
    return [perm[j * G + rank * batch_size: j * G + (rank + 1) * batch_size] for j in range(n // G)]


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every buffer (FRoD: basis, pattern, sigma) and trainable parameter: equal on every rank."""
    import hashlib

    h = hashlib.sha256()
    items = [(n, b) for n, b in model.named_buffers() if b is not None]
    items += [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, t in sorted(items, key=lambda x: x[0]):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class NonFiniteLoss(FrodCliError):
    pass


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _plain(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _resume_point(cfg: Any, output_dir: str, main: bool) -> Optional[str]:
    """The checkpoint to continue from: resume=<run dir>, or an incomplete run in output_dir with the
    same config (automatic). Refuses a directory that is not a resumable run of this config."""
    from frod_cli import checkpoint as ck

    if cfg.resume:
        where = cfg.resume
        if not os.path.isdir(where):
            raise FrodCliError(f"resume: no such run directory: {where}")
        latest = ck.latest_checkpoint(where)
        if latest is None:
            raise FrodCliError(f"resume: {where} has no checkpoint (checkpoints/step-*/) to continue from")
        if os.path.exists(os.path.join(where, "metrics.json")):
            raise FrodCliError(f"resume: {where} is a finished run (metrics.json exists); nothing to continue")
        ck.check_same_run(ck.saved_config(latest), _plain(cfg), where)
        return latest
    latest = ck.latest_checkpoint(output_dir)
    if latest is None or os.path.exists(os.path.join(output_dir, "metrics.json")):
        return None
    ck.check_same_run(ck.saved_config(latest), _plain(cfg), f"output directory {output_dir}")
    if main:
        log.info("output directory %s holds an incomplete run of this config: resuming from %s", output_dir, latest)
    return latest


def train(cfg: Any, output_dir: Optional[str] = None) -> float:
    """Train one recipe; write the run directory; return the validation objective of the best
    checkpoint (what the Optuna sweeper optimizes)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from torch.utils.data import DataLoader

    from frod_cli import checkpoint as ck

    t_start = time.time()
    cfg = _resolve_cfg(cfg)
    _quiet_libraries()
    tc = cfg.train
    mixed = tc.mixed_precision
    if mixed != "no" and (tc.cpu or not torch.cuda.is_available()):
        log.info("mixed_precision=%s needs a GPU; training in float32", mixed)
        mixed = "no"
    # Gradient accumulation is done by the loop (below), so resuming never depends on Accelerate's counters.
    acc = Accelerator(mixed_precision=mixed, cpu=bool(tc.cpu))
    main = acc.is_main_process
    ga = int(tc.grad_accum)

    # One output directory for all processes: the main process's.
    out = [cfg.resume or output_dir or cfg.output_dir]
    if acc.num_processes > 1:
        broadcast_object_list(out)
    output_dir = out[0]
    if output_dir is None:
        raise FrodCliError("no output directory (run through `frod train` or set output_dir=...)")
    if cfg.resume and cfg.output_dir and os.path.abspath(cfg.output_dir) != os.path.abspath(cfg.resume):
        raise FrodCliError("resume continues in the run directory it names: drop output_dir")
    if main:
        check_output_dir(output_dir)
        for name in ("adapter", "merged"):
            recover_atomic_dir(os.path.join(output_dir, name))
    resume_from = _resume_point(cfg, output_dir, main)

    set_seed(int(tc.seed))
    task = build_task(cfg.task, int(tc.seed))
    data = task.load_data()
    for split in ("train", "validation"):
        if split not in data:
            raise FrodCliError(f"task {cfg.task.name}: no {split!r} split")
        if len(data[split]) == 0:
            raise FrodCliError(f"task {cfg.task.name}: the {split!r} split is empty")
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
        trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # 2 checkpoints x (values + best + 2 optimizer moments) + adapter (+ merged model) + slack
        need = 2 * 4 * trainable_bytes + trainable_bytes + (total_bytes if tc.save_merged else 0) + 2**20
        check_free_space(output_dir, need)
    # Every rank must hold the same adapter (FRoD: basis and pattern) and the same initial values.
    fingerprints = gather_object([state_fingerprint(model)]) if acc.num_processes > 1 else [state_fingerprint(model)]
    if len(set(fingerprints)) > 1:
        raise FrodCliError(f"the adapted model differs between processes ({len(set(fingerprints))} variants): "
                           "check that every rank loads the same base model and seed")

    with acc.main_process_first():
        encoded = task.encode(data, preprocessor)
    collate = task.collate(preprocessor)
    train_set = encoded["train"]
    val_loader = make_loader(encoded["validation"], int(tc.eval_batch_size), collate, False, 0, int(tc.num_workers))
    has_test = "test" in encoded and bool(tc.eval_test)
    test_loader = make_loader(encoded["test"], int(tc.eval_batch_size), collate, False, 0, int(tc.num_workers)) if has_test else None

    model, optimizer, val_loader = acc.prepare(model, optimizer, val_loader)
    if test_loader is not None:
        test_loader = acc.prepare(test_loader)

    n_micro = len(epoch_batches(len(train_set), int(tc.batch_size), acc.num_processes, acc.process_index, int(tc.seed), 0))
    if n_micro == 0:
        raise FrodCliError(f"the training split ({len(train_set)} examples) is smaller than one global batch "
                           f"({int(tc.batch_size)} x {acc.num_processes} processes)")
    steps_per_epoch = max(1, math.ceil(n_micro / ga))
    total_steps = int(tc.max_steps) if int(tc.max_steps) > 0 else max(1, math.ceil(float(tc.epochs) * steps_per_epoch))
    scheduler, warmup = build_scheduler(optimizer, cfg.optimizer, total_steps)
    eval_every = int(tc.eval_every) if int(tc.eval_every) > 0 else steps_per_epoch
    ckpt_every = int(tc.checkpoint_every)
    samples_per_step = int(tc.batch_size) * ga * acc.num_processes
    objective, mode = cfg.task.objective, cfg.task.objective_mode

    unwrapped = acc.unwrap_model(model)
    trainable_names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    best: Optional[float] = None
    best_step = 0
    best_val: Dict[str, float] = {}
    best_state: Optional[Dict[str, torch.Tensor]] = None
    bad_evals = 0
    adapter_dir = os.path.join(output_dir, "adapter")
    jsonl_path = os.path.join(output_dir, "metrics.jsonl")
    step = 0
    epoch = 0
    step_in_epoch = 0
    last_eval_step = -1
    last_ckpt: Optional[str] = None
    window_loss = torch.zeros(2, device=acc.device)  # sum, count
    resumed_state: Optional[Dict[str, Any]] = None

    def snapshot() -> Dict[str, torch.Tensor]:
        params = dict(unwrapped.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in trainable_names}

    if resume_from is not None:
        saved = ck.load_checkpoint(resume_from)
        missing = set(trainable_names) - set(saved["trainable"])
        if missing:
            raise FrodCliError(f"checkpoint {resume_from} does not fit this model: no values for {sorted(missing)[:3]}")
        with torch.no_grad():
            params = dict(unwrapped.named_parameters())
            for n in trainable_names:
                params[n].copy_(saved["trainable"][n].to(params[n].device))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        st = saved["state"]
        if int(st.get("num_processes", 1)) != acc.num_processes:
            raise FrodCliError(f"checkpoint {resume_from} was written by {st.get('num_processes')} processes; "
                               f"resume it with the same number (this launch has {acc.num_processes})")
        step, epoch, step_in_epoch = int(st["step"]), int(st["epoch"]), int(st["step_in_epoch"])
        best, best_step, best_val = st["best"], int(st["best_step"]), dict(st["best_val"])
        bad_evals, last_eval_step = int(st["bad_evals"]), int(st["last_eval_step"])
        best_state = saved["best"]
        if main:
            window_loss += torch.tensor(st["window_loss"], device=acc.device)
            size = int(st["jsonl_bytes"])
            if os.path.exists(jsonl_path) and os.path.getsize(jsonl_path) > size:
                with open(jsonl_path, "r+b") as f:  # drop what was logged after the checkpoint
                    f.truncate(size)
        resumed_state = saved
        last_ckpt = resume_from
    jsonl = JsonlWriter(jsonl_path) if main else None
    acc.wait_for_everyone()

    def save_ckpt() -> None:
        nonlocal last_ckpt
        win = acc.reduce(window_loss.clone(), reduction="sum") if acc.num_processes > 1 else window_loss
        if main:
            state = {
                "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "best": best, "best_step": best_step,
                "best_val": best_val, "bad_evals": bad_evals, "last_eval_step": last_eval_step,
                "window_loss": [float(x) for x in win.tolist()], "jsonl_bytes": os.path.getsize(jsonl_path),
                "num_processes": acc.num_processes, "total_steps": total_steps,
            }
            last_ckpt = ck.save_checkpoint(
                output_dir, step, trainable=snapshot(), best=best_state, optimizer_sd=optimizer.state_dict(),
                scheduler_sd=scheduler.state_dict(), state=state, config=_plain(cfg))
        acc.wait_for_everyone()

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
    ptask = progress.add_task(f"{cfg.recipe_name} [{cfg.method.name}]", total=total_steps, completed=step, loss="-", lr="-", sps="-") if progress else None

    model.train()
    if resumed_state is not None:  # the RNG streams (dropout, ...) as they were at the checkpoint
        ck.set_rng_state(*resumed_state["rng"])
        resumed_state = None
    t_window = time.time()
    steps_window = 0
    t_train = time.time()
    first_step = step
    stop = step >= total_steps
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    loader_gen = torch.Generator()  # the DataLoader's own seed draws must not touch the global RNG
    try:
        if progress:
            progress.start()
        while step < total_steps and not stop:
            batches = epoch_batches(len(train_set), int(tc.batch_size), acc.num_processes, acc.process_index,
                                    int(tc.seed), epoch)
            loader = DataLoader(train_set, batch_sampler=batches[step_in_epoch * ga:], collate_fn=collate,
                                num_workers=int(tc.num_workers), generator=loader_gen)
            it = iter(loader)
            for k in range(step_in_epoch, steps_per_epoch):
                size = min(ga, n_micro - k * ga)
                bad = torch.zeros((), device=acc.device)
                bad_value = torch.zeros((), device=acc.device)
                for j in range(size):
                    batch = next(it)
                    batch = {key: v.to(acc.device) if torch.is_tensor(v) else v for key, v in batch.items()}
                    ctx = acc.no_sync(model) if j < size - 1 else contextlib.nullcontext()
                    with ctx:
                        loss = task.loss(model, batch)  # the prepared model autocasts under mixed precision
                        # flagged on the device (no sync per micro-batch); checked once per optimizer step
                        nonfinite = ~torch.isfinite(loss.detach().float())
                        bad += nonfinite.any()
                        bad_value = torch.where(nonfinite, loss.detach().float(), bad_value).reshape(())
                        acc.backward(loss / size)
                    window_loss += torch.stack([loss.detach().float(), torch.ones((), device=acc.device)])
                if acc.num_processes > 1:
                    bad = acc.reduce(bad, reduction="sum")
                if float(bad) > 0:
                    where = f"checkpoint {last_ckpt}" if last_ckpt else "none (no checkpoint was saved before it)"
                    raise NonFiniteLoss(f"the loss became {float(bad_value)} at step {step + 1} (epoch {epoch}): "
                                        f"training stopped; last good checkpoint: {where}")
                if float(cfg.optimizer.max_grad_norm) > 0:
                    acc.clip_grad_norm_(trainable_params, float(cfg.optimizer.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                step_in_epoch = k + 1
                steps_window += 1
                if step % int(tc.log_every) == 0 or step == total_steps:
                    tot = acc.reduce(window_loss, reduction="sum") if acc.num_processes > 1 else window_loss
                    mean_loss = float(tot[0] / tot[1].clamp(min=1))
                    dt = max(time.time() - t_window, 1e-9)
                    sps = steps_window * samples_per_step / dt
                    elapsed = time.time() - t_train
                    eta = elapsed / max(step - first_step, 1) * (total_steps - step)
                    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                    if main:
                        jsonl.write({
                            "step": step, "epoch": round(epoch + step_in_epoch / steps_per_epoch, 4),
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
                evaluated = False
                if step % eval_every == 0 or step == total_steps:
                    last_eval_step = step
                    evaluated = True
                    if do_eval(step):
                        if main:
                            log.info("early stopping at step %d (patience %d)", step, tc.early_stopping_patience)
                        stop = True
                if evaluated or (ckpt_every > 0 and step % ckpt_every == 0):
                    save_ckpt()
                if stop or step >= total_steps:
                    break
            else:
                epoch += 1
                step_in_epoch = 0
    except BaseException:
        if jsonl is not None:
            jsonl.close()
        raise
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
    if main and tc.save_adapter and best_state is not None and not os.path.isdir(adapter_dir):
        atomic_dir(adapter_dir, lambda d: method.save_adapter(acc.unwrap_model(model), d))  # resumed runs
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
        "rank_fingerprints": fingerprints,
        "resumed_from": resume_from,
        "mixed_precision": mixed,
    }
    if main:
        jsonl.close()
        atomic_write_json(os.path.join(output_dir, "metrics.json"), final)
        plot_loss_curve(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "loss.png"),
                        title=f"{cfg.recipe_name}: {cfg.method.name} on {cfg.task.name}")
        _print_final(final, output_dir)
        if not tc.keep_checkpoints:
            import shutil

            shutil.rmtree(os.path.join(output_dir, ck.CHECKPOINTS), ignore_errors=True)
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
