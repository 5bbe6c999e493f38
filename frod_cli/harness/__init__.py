"""lm-evaluation-harness on a run's model: `frod eval path=<run> harness.tasks=[...]` (or `harness=commonsense`).

The model is handed to the harness in process (lm_eval's HFLM takes a model object and a tokenizer): the run's
merged/, or with use_adapter=true its base model + adapter/ unmerged (inside the method's evaluation context, as
frod eval scores it), or any saved causal LM directory. Tasks are looked up in frod's packaged tasks (tasks/:
frod_arith, offline) and harness.include_path first; lm-eval's own catalogue (thousands of YAMLs, ~20 s to index)
only when a task is not there. Results go to harness.json (atomically; an existing one is refused unless
overwrite=true) and, for a run that had trackers (train.log_with), to those too, as harness/<task>/<metric>.

Why frod eval and not a verb of its own: it is another evaluation of the same model, so it shares frod eval's path
rules (run directory, merged/ or use_adapter=true, a model directory), its output and overwrite rule, batch_size,
seed and cpu; harness.* holds what only the harness has, and task=/splits= (frod's own evaluation) are refused
beside it."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from frod_cli import FrodCliError, one_line

log = logging.getLogger("frod.harness")
PACKAGED_TASKS = Path(__file__).with_name("tasks")
LM_EVAL = "lm-eval==0.4.13"
CAUSAL = "AutoModelForCausalLM"
FROD_ONLY_KEYS = ("task", "splits")  # frod's own evaluation: refused beside harness.tasks


def check(cfg: Any, overrides: Sequence[str]) -> bool:
    """Whether this frod eval runs the harness; refuses what does not fit before anything loads."""
    from frod_cli.config import override_keys

    keys = override_keys(overrides)
    h = cfg.harness
    if not h.tasks:
        given = sorted(k for k in keys if k.startswith("harness."))
        if given:
            raise FrodCliError(f"{given[0]} is a setting of lm-evaluation-harness runs: add harness.tasks=[...] "
                               "(or harness=commonsense)")
        return False
    mixed = sorted(k for k in keys if k.split(".")[0] in FROD_ONLY_KEYS)
    if mixed:
        raise FrodCliError(f"{mixed[0]} chooses frod's own evaluation; harness.tasks runs lm-evaluation-harness's "
                           "tasks: run them as two frod eval commands")
    if importlib.util.find_spec("lm_eval") is None:
        raise FrodCliError(f"harness.tasks needs lm-evaluation-harness: pip install {LM_EVAL}")
    if h.num_fewshot is not None and int(h.num_fewshot) < 0:
        raise FrodCliError(f"harness.num_fewshot must be >= 0, got {h.num_fewshot}")
    if h.limit is not None and not float(h.limit) > 0:
        raise FrodCliError(f"harness.limit must be > 0 (examples per task, or a fraction below 1), got {h.limit}")
    if h.include_path is not None and not os.path.isdir(os.path.expanduser(str(h.include_path))):
        raise FrodCliError(f"harness.include_path {h.include_path}: no such directory")
    return True


def task_manager(tasks: List[str], include_path: Optional[str]) -> Any:
    """lm-eval's TaskManager over frod's packaged tasks and include_path; its own catalogue only when needed."""
    from lm_eval.tasks import TaskManager

    paths = [str(PACKAGED_TASKS)] + ([os.path.abspath(os.path.expanduser(include_path))] if include_path else [])
    with quiet("lm_eval"):
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            log.info("indexing lm-evaluation-harness's own tasks (about 20 s)")
            manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        raise FrodCliError(f"harness.tasks: lm-evaluation-harness has no task {unknown[0]!r}"
                           + (f"; did you mean {', '.join(near)}?" if near else "")
                           + " (your own task YAMLs: harness.include_path=<dir>)")
    return manager


@contextlib.contextmanager
def quiet_git(evaluator: Any):
    """lm-eval records `git describe` of the working directory, and outside a repository git prints "fatal: not a
    git repository" on stderr, which reads like frod failing: the same record with git's stderr silenced."""
    import subprocess

    def git_hash() -> Optional[str]:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        return done.stdout.strip() or None

    with contextlib.ExitStack() as stack:
        if hasattr(evaluator, "get_git_commit_hash"):
            from unittest import mock

            stack.enter_context(mock.patch.object(evaluator, "get_git_commit_hash", git_hash))
        yield


@contextlib.contextmanager
def quiet(name: str, level: int = logging.WARNING):
    """A library's chatter (INFO lines per task and request) down to warnings while it runs."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def load(cfg: Any) -> Any:
    """The model to score, as frod eval loads it (builders.load_trained), with the tokenizer the harness uses."""
    from frod_cli.runs import is_run_dir, read_config
    from frod_cli.tasks import get_task, task_config
    from frod_cli.training import builders as B

    path = os.path.abspath(os.path.expanduser(str(cfg.path)))
    if is_run_dir(path):
        kind = str((read_config(path).get("task") or {}).get("type"))
        auto = get_task(kind).auto_class
        if auto != CAUSAL:
            raise FrodCliError(f"lm-evaluation-harness scores causal language models; the run {path} trained a "
                               f"{auto} (task type {kind})")
        task_cfg = None
    else:  # a saved model directory: loaded as a causal LM (the task only picks the Auto class)
        task_cfg = task_config("causal_lm", name="lm-evaluation-harness")
    trained = B.load_trained(path, use_adapter=bool(cfg.use_adapter), task_cfg=task_cfg, seed=cfg.seed,
                             load_data=False)
    trained.preprocessor = run_tokenizer(trained) or trained.preprocessor
    return trained


def run_tokenizer(trained: Any) -> Any:
    """A tiny: base's tokenizer rebuilt as the run trained with it, for its merged/ (None otherwise). merged/ keeps
    MiniLM's BertTokenizer, whose class puts BERT's `[CLS] A [SEP]` template back on load (transformers 5), so every
    scored continuation would end in [SEP]; base + adapter/ loads the run's own tokenizer already."""
    run = trained.run
    if run is None or trained.method is not None or not str(run.model.name_or_path).startswith("tiny:"):
        return None
    from frod_cli.chat_templates import install_chat_template
    from frod_cli.models import load_preprocessor

    tok = load_preprocessor(run.model, trained.task)
    if run.task.chat_template:
        install_chat_template(tok, run.task.chat_template)
    return tok


def limit(value: Optional[float]) -> Any:
    """harness.limit as lm-eval reads it: a count of examples (an int), or a fraction of them below 1."""
    if value is None:
        return None
    return float(value) if float(value) < 1 else int(value)


def simple_evaluate(cfg: Any, trained: Any, device: Any) -> Dict[str, Any]:
    """lm_eval.simple_evaluate on the model object, inside the method's evaluation context (FRoD: W + dW held)."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    h = cfg.harness
    if h.apply_chat_template and not getattr(trained.preprocessor, "chat_template", None):
        raise FrodCliError(f"harness.apply_chat_template=true: the tokenizer of {trained.what} has no chat template")
    tasks = [str(t) for t in h.tasks]
    manager = task_manager(tasks, h.include_path)
    model = trained.model.to(device).eval()
    with quiet("lm_eval.models.huggingface", logging.ERROR):  # "`pretrained` model kwarg is not of type `str`"
        lm = HFLM(pretrained=model, tokenizer=trained.preprocessor, batch_size=int(cfg.batch_size), device=str(device))
    seeds = {} if cfg.seed is None else {k: int(cfg.seed) for k in ("random_seed", "numpy_random_seed",
                                                                   "torch_random_seed", "fewshot_random_seed")}
    context = trained.method.evaluation_context(model) if trained.method is not None else contextlib.nullcontext()
    with context, quiet("lm_eval"), quiet("lm_eval.api.task", logging.ERROR), quiet_git(lm_eval.evaluator):
        try:
            return lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=h.num_fewshot, limit=limit(h.limit), task_manager=manager,
                log_samples=bool(h.log_samples), apply_chat_template=bool(h.apply_chat_template), **seeds)
        except (OSError, ConnectionError) as e:  # a task's data set that cannot be read (offline: the Hub's)
            raise FrodCliError(f"lm-evaluation-harness could not read a task's data: {one_line(e)}") from e


def evaluate(cfg: Any, out: str) -> Dict[str, Any]:
    """`frod eval ... harness.tasks=[...]`: the harness on the model, harness.json at `out`, the trackers."""
    from accelerate import Accelerator

    from frod_cli.runs import atomic_write_json
    from frod_cli.training import builders as B

    B.quiet_libraries()
    trained = load(cfg)
    run_dir = os.path.abspath(str(cfg.path))
    trackers = tracker_kwargs(run_dir, trained.run)
    acc = Accelerator(cpu=bool(cfg.cpu), **trackers)
    raw = simple_evaluate(cfg, trained, acc.device)
    h = cfg.harness
    record = {"path": run_dir, "model": trained.what, "tasks": list(h.tasks), "num_fewshot": h.num_fewshot,
              "limit": h.limit, "batch_size": int(cfg.batch_size),
              **{k: v for k, v in (raw or {}).items() if k != "samples" or h.log_samples}}
    if acc.is_main_process:
        atomic_write_json(out, record)
        print(table(record))
        print(f"wrote {out}")
    if trackers:
        log_to_trackers(acc, run_dir, trained.run, record)
    return record


def metric_rows(record: Dict[str, Any]) -> List[tuple]:
    """(task, metric, value, stderr or None) of every score in lm-eval's results."""
    rows = []
    for task, values in (record.get("results") or {}).items():
        for key, value in values.items():
            metric, comma, _ = key.partition(",")  # lm-eval's "<metric>,<filter>" keys; the rest are labels
            if comma and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                err = values.get(key.replace(metric, f"{metric}_stderr", 1))
                rows.append((task, metric, float(value), err if isinstance(err, (int, float)) else None))
    return rows


def table(record: Dict[str, Any]) -> str:
    shots, counts = record.get("n-shot") or {}, record.get("n-samples") or {}
    lines = [f"lm-evaluation-harness on {record['model']}:"]
    for task, metric, value, err in metric_rows(record):
        n = (counts.get(task) or {}).get("effective")
        lines.append(f"  {task:<20} {metric:<10} {value:.4f}" + (f" ± {err:.4f}" if err is not None else "")
                     + f"  ({n} examples, {shots.get(task, 0)}-shot)")
    return "\n".join(lines)


def tracker_kwargs(run_dir: str, run: Any) -> Dict[str, Any]:
    """Accelerator's tracker settings of a run that had trackers (train.log_with), else {}."""
    from frod_cli.training.trackers import Trackers

    if run is None or not run.train.log_with:
        return {}
    try:
        return Trackers.accelerator_kwargs(run, run_dir)
    except FrodCliError as e:  # a tracker no longer installed: the results are in harness.json all the same
        log.warning("the harness results go to harness.json only: %s", e)
        return {}


def log_to_trackers(acc: Any, run_dir: str, run: Any, record: Dict[str, Any]) -> None:
    """harness/<task>/<metric> into the run's trackers, at the run's last step."""
    from frod_cli.runs import read_metrics
    from frod_cli.training.trackers import Trackers

    trackers = Trackers(acc, run, run_dir)
    step = int((read_metrics(run_dir) or {}).get("steps") or 0)
    trackers.log_evaluation("harness", {f"{t}/{m}": v for t, m, v, _ in metric_rows(record)}, step)
    acc.end_training()
    if acc.is_main_process:
        log.info("harness results logged to the run's trackers (%s)", ", ".join(trackers.names))
