"""The pieces `frod train`, `frod eval`, `frod merge` and `frod generate` build alike: task, model,
method, loaders, optimizer, schedule; and a trained model back from a run directory."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from frod_cli import FrodCliError, one_line

log = logging.getLogger("frod.build")


@contextlib.contextmanager
def user_input(what: str) -> Iterator[None]:
    """Errors that libraries raise on bad user input (a missing file, a malformed data set, a model id
    that does not load) become one-line refusals; everything else stays a bug with its traceback."""
    try:
        yield
    except FrodCliError:
        raise
    except (ValueError, OSError) as e:
        raise FrodCliError(f"{what}: {one_line(e)}") from e


def import_libraries(method: str, task_type: str) -> None:
    """Import what every run uses, and what its method builds with and its task scores with, before its clock starts
    (metrics.json's wall_time_s): the process pays it once, and a sweep's first job would otherwise carry it alone."""
    import importlib

    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    from frod_cli.methods import get_method
    from frod_cli.tasks import get_task

    for name in (*get_method(method).libraries, *get_task(task_type).libraries):
        importlib.import_module(name)

    from frod_cli.runs.plots import pyplot

    pyplot()
    global _LIBRARIES_FROZEN
    if not _LIBRARIES_FROZEN:
        # The libraries' objects live as long as the process: kept out of every later garbage collection (each
        # run ends with one, Accelerate's; a full scan of them costs about half a second)
        import gc

        gc.freeze()
        _LIBRARIES_FROZEN = True


_LIBRARIES_FROZEN = False  # once per process: a later call would also freeze what the runs before it left


# Library warnings printed on every run that say nothing about the user's input: transformers deprecating an
# attribute PEFT reads; PEFT looking for a base model's config.json on the Hub (offline, or a tiny:* name) only
# to decide whether to save the embeddings, which frod's targets never include; torch's sparse-tensor checks.
LIBRARY_NOISE = (r".*(is_gradient_checkpointing|Could not find a config file in|Sparse invariant checks"
                 r"|base_model_name_or_path).*")


def quiet_libraries() -> None:
    """The loop has its own progress bar: silence the libraries' per-map/per-shard bars, and the warnings in
    LIBRARY_NOISE."""
    import warnings

    warnings.filterwarnings("ignore", message=LIBRARY_NOISE)
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def build_task(task_cfg: Any, seed: int):
    """The task of a config (its keys checked as it is built: Task.check_config)."""
    from frod_cli.tasks import get_task

    with user_input(f"task {task_cfg.name}"):
        return get_task(task_cfg.type)(task_cfg, seed)


def load_task_data(task: Any, required: Tuple[str, ...] = ("train", "validation")):
    with user_input(f"task {task.cfg.name}"):
        data = task.load_data()
    for split in required:
        if split not in data:
            raise FrodCliError(f"task {task.cfg.name}: no {split!r} split")
        if hasattr(data[split], "__len__") and len(data[split]) == 0:  # a streamed split has no length
            raise FrodCliError(f"task {task.cfg.name}: the {split!r} split is empty")
    return data


def encode_data(task: Any, data: Any, preprocessor: Any):
    with user_input(f"task {task.cfg.name}"):
        return task.encode(data, preprocessor)


def load_model(model_cfg: Any, task: Any, **options: Any):
    """(model, preprocessor) for the task (frod_cli.models)."""
    from frod_cli.models import load_model as _load

    with user_input(f"model {model_cfg.name_or_path}"):
        return _load(model_cfg, task, **options)


def build_method(method_cfg: Any, task: Any, model_cfg: Any):
    from frod_cli.methods import build_method as _build

    return _build(method_cfg, task, model_cfg)


def make_loader(dataset, batch_size: int, collate, shuffle: bool = False, seed: int = 0, num_workers: int = 0):
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=num_workers,
                      generator=g if shuffle else None)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


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


def build_optimizer(opt_cfg: Any, groups: Dict[str, List[torch.nn.Parameter]]):
    """AdamW or SGD over the method's named groups, each at optimizer.group_lr.<name> (else lr) x lr_scale."""
    unknown = set(opt_cfg.group_lr or {}) - set(groups)
    if unknown:
        log.info("optimizer.group_lr keys %s do not name a parameter group of this method (groups: %s); "
                 "they are ignored", sorted(unknown), sorted(groups))
    scale = float(opt_cfg.lr_scale)
    param_groups = []
    for name, params in groups.items():
        params = [p for p in params if p.requires_grad]
        if params:
            lr = float((opt_cfg.group_lr or {}).get(name, opt_cfg.lr)) * scale
            param_groups.append({"params": params, "lr": lr, "name": name})
    if not param_groups:
        raise FrodCliError("the method left no trainable parameter")
    lr, wd = float(opt_cfg.lr) * scale, float(opt_cfg.weight_decay)
    if opt_cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(float(b) for b in opt_cfg.betas),
                                 eps=float(opt_cfg.eps), weight_decay=wd)
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=wd)
    raise FrodCliError(f"unknown optimizer.name {opt_cfg.name!r}; available: adamw, sgd")


def lr_factor(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step of optimizer.scheduler (constant | linear | cosine), after a
    linear warmup: transformers' get_cosine/linear/constant_with_warmup schedules, term for term (a test compares
    every step with them). Written here because importing transformers.optimization imports its trainer_utils, and
    with it PEFT, bitsandbytes and torch's inductor: about 1.2 s of every run's start, for three formulas."""

    def factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if name == "constant":
            return 1.0
        if name == "linear":
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # half a cosine cycle

    return factor


def build_scheduler(optimizer, opt_cfg: Any, total_steps: int):
    """(scheduler, warmup steps); optimizer.scheduler was checked by preflight.validate."""
    warmup = int(opt_cfg.warmup_steps) or int(math.ceil(float(opt_cfg.warmup_ratio) * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(str(opt_cfg.scheduler), warmup, total_steps)), warmup


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every buffer (FRoD: basis, pattern, sigma) and trainable parameter: equal on every rank. A
    sharded parameter (method=full under FSDP) is hashed whole: a collective then, every rank calls it."""
    from frod_cli.training.sharded import whole

    h = hashlib.sha256()
    items = [(n, b) for n, b in model.named_buffers() if b is not None]
    items += [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, t in sorted(items, key=lambda x: x[0]):
        t = whole(t.detach())
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_base(model_cfg: Any, task: Any, seed: int, **options: Any):
    """(model, preprocessor) as `frod train` loads the base: the seed is set first, so a model built from a
    config (tiny:*) gets the same init in train, eval, merge and the rebuild of a sharded run. options: how a
    sharded launch loads it (models.load_model's empty, quant_storage, quant_device; training/distributed.py)."""
    from accelerate.utils import set_seed

    set_seed(int(seed))
    return load_model(model_cfg, task, **options)


def load_adapted(model_cfg: Any, method_cfg: Any, task: Any, seed: int, adapter_dir: str):
    """(adapted model, preprocessor, method): the base as `load_base` gives it, with a saved adapter."""
    base, pre = load_base(model_cfg, task, seed)
    method = build_method(method_cfg, task, model_cfg)
    return method.load_adapter(base, str(adapter_dir)), pre, method


@dataclass
class Trained:
    """A trained model back from a run or model directory (`load_trained`)."""

    model: Any
    preprocessor: Any
    task: Any
    data: Any  # the task's raw splits, or None (load_data=False)
    what: str  # what was loaded, for messages: "merged/", "<base> + <method> adapter", a path
    run: Any = None  # the run's config (load_run_config), None for a model directory
    method: Any = None  # the method that loaded adapter/ (None for merged/ and model directories)


def load_trained(path: str, *, use_adapter: bool = False, task_cfg: Any = None, seed: Optional[int] = None,
                 dtype: Optional[str] = None, load_data: bool = True) -> Trained:
    """A trained model back from a run directory (its merged/, or base model + adapter/) or from a saved
    model directory."""
    from omegaconf import OmegaConf

    from frod_cli.config import ModelConfig
    from frod_cli.runs import RunPaths, is_run_dir, load_run_config, recover_atomic_dir

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FrodCliError(f"no such run directory or model directory: {path}")
    if not is_run_dir(path):
        if task_cfg is None:
            raise FrodCliError(f"{path} is a model directory, not a run directory: name its task (task=<name>)")
        task = build_task(task_cfg, int(42 if seed is None else seed))
        data = load_task_data(task, required=()) if load_data else None
        mcfg = OmegaConf.structured(ModelConfig(name_or_path=path, dtype=dtype or "float32"))
        model, pre = load_model(mcfg, task)
        return Trained(model, pre, task, data, path)
    run, paths = load_run_config(path), RunPaths.of(path)
    for d in (paths.adapter, paths.merged):
        recover_atomic_dir(str(d))
    seed = int(run.train.seed if seed is None else seed)
    task = build_task(task_cfg if task_cfg is not None else run.task, seed)
    data = load_task_data(task, required=()) if load_data else None
    if not use_adapter and paths.merged.is_dir():
        mcfg = OmegaConf.structured(ModelConfig(name_or_path=str(paths.merged), dtype=dtype or run.model.dtype))
        model, pre = load_model(mcfg, task)
        return Trained(model, pre, task, data, "merged/", run)
    if not paths.adapter.is_dir():
        raise FrodCliError(f"{path} has neither merged/ nor adapter/")
    model, pre, method = load_adapted(run.model, run.method, task, seed, str(paths.adapter))
    return Trained(model, pre, task, data, f"{run.model.name_or_path} + {run.method.name} adapter", run, method)


def fill_batch_size(asked: int, processes: int, examples: Optional[int], main: bool) -> int:
    """train.batch_size, clamped (with a log line) to what the training split can fill: a batch larger than the data
    would silently be the whole split, and every throughput figure would be off. examples=None: a stream, which
    fills any batch (it starts another pass when one ends)."""
    if examples is None or asked * processes <= examples:
        return asked
    size = max(1, examples // processes)
    if main:
        logging.getLogger("frod.train").warning(
            "train.batch_size=%d%s is larger than the training split (%d examples): batches of %d",
            asked, f" x {processes} processes" if processes > 1 else "", examples, size)
    return size


def schedule_lengths(tc: Any, examples: Optional[int], batch_size: int, processes: int, rank: int) -> Tuple[int, int, int]:
    """(micro-batches per epoch, optimizer steps per epoch, total optimizer steps) of train.* on `examples`
    training examples (None: a stream, as long as train.max_steps asks)."""
    accum = int(tc.grad_accum)
    n = int(tc.max_steps) * accum if examples is None else len(
        epoch_batches(examples, batch_size, processes, rank, int(tc.seed), 0))
    if n == 0:
        raise FrodCliError(f"the training split ({examples} examples) cannot give each of the {processes} processes "
                           "one example per batch")
    per_epoch = max(1, math.ceil(n / accum))
    total = int(tc.max_steps) if int(tc.max_steps) > 0 else max(1, math.ceil(float(tc.epochs) * per_epoch))
    return n, per_epoch, total


def epoch_loader(dataset: Any, batch_size: int, processes: int, rank: int, tc: Any, epoch: int, skip: int,
                 collate: Any) -> Any:
    """This process's micro-batches of one epoch (epoch_batches) from the `skip`-th on, collated."""
    from torch.utils.data import DataLoader

    batches = epoch_batches(len(dataset), batch_size, processes, rank, int(tc.seed), epoch)
    return DataLoader(dataset, batch_sampler=batches[skip:], collate_fn=collate, num_workers=int(tc.num_workers),
                      generator=torch.Generator())  # the loader's own seed draws leave the global RNG alone


def log_trainables(cfg: Any, counts: Dict[str, Any], groups: Dict[str, list], adapt_s: float) -> None:
    """The run's first line about its model: what is trained, in which groups, and how long adapting took."""
    quant = str(cfg.model.get("quantization", "none") or "none")
    logging.getLogger("frod.train").info(
        "%s%s on %s with %s: %s trainable of %s (%.3f%%); groups %s; adapt %.1fs", cfg.model.name_or_path,
        "" if quant == "none" else f" (frozen weights in {quant.upper()})", cfg.task.name, cfg.method.name,
        f"{counts['trainable_params']:,}", f"{counts['total_params']:,}", counts["trainable_percent"],
        {k: sum(p.numel() for p in v) for k, v in groups.items()}, adapt_s)
