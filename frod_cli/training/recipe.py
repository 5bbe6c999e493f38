"""The fine-tuning recipe (Accelerate), in the spirit of torchtune's FTRecipeInterface: `setup`, `load_checkpoint`,
`train`, `evaluate`, `save_checkpoint`, `finalize`, the run's state in attributes and one `TrainState`. It keeps the
loop and the schedule of evaluations and checkpoints, and knows nothing about FRoD: the method gives it parameter
groups, a context around each accumulation window (`Method.accumulation`), its hooks (`before_sharding`) and saves
and merges; the task gives it data, evaluation (`Task.evaluate`), a pass with the starting model
(`Task.prepare_training`) and the strategy of one optimizer step (`Task.training_step`, tasks/steps.py).
Where the rest lives: training/setup.py (what the loop is built from), runs/writer.py (the run directory),
training/resume.py (checkpoints), training/merging.py (merged/), training/metrics.py (throughput, memory,
metrics.json), training/dtypes.py (float32 trainables, gradient checkpointing)."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from frod_cli import FrodCliError
from frod_cli.config import apply_per_method
from frod_cli.console import TrainingProgress, fmt_metrics
from frod_cli.precision import settle
from frod_cli.runs import atomic_dir
from frod_cli.runs.writer import RunWriter
from frod_cli.share.hub import check_push_settings, push_finished_run
from frod_cli.training import builders as B
from frod_cli.training import checkpoint as ck
from frod_cli.training import distributed as D
from frod_cli.training import merging, preflight, resume
from frod_cli.training import sharded as S
from frod_cli.training import streaming as TS
from frod_cli.training.evaluation import majority_accuracy
from frod_cli.training.metrics import LoopMeter, final_metrics, training_record
from frod_cli.training.setup import RecipeSetup
from frod_cli.training.state import TrainState
from frod_cli.training.trackers import Trackers

log = logging.getLogger("frod.train")


class NonFiniteLoss(FrodCliError):
    pass


class FinetuneRecipe(RecipeSetup):
    """One `frod train` run. `recipe_main` shows the order of the calls."""

    def __init__(self, cfg: Any, output_dir: Optional[str], user_overrides: Sequence[str] = (),
                 hydra_files: Optional[Dict[str, Any]] = None, run_log: Optional[Any] = None):
        """output_dir: where the run goes unless cfg.resume or cfg.output_dir names it (Hydra's run dir).
        hydra_files: Hydra's part of the .hydra/ files of a new run ({hydra_config, overrides}), written with the
        config as it runs when the run is accepted; run_log: a frod_cli.runs.directory.RunLog holding the log
        records until train.log opens."""
        from omegaconf import OmegaConf

        self.user_overrides, self.hydra_files, self.run_log = list(user_overrides), hydra_files, run_log
        apply_per_method(cfg, user_overrides)
        preflight.apply_task_defaults(cfg.task, user_overrides)
        preflight.apply_user_data(cfg.task, user_overrides)
        preflight.validate(cfg)
        check_push_settings(cfg.train)  # train.push_to_hub: refused now, not after the training
        OmegaConf.resolve(cfg)
        self.cfg, self.tc = cfg, cfg.train
        self.requested_output = output_dir
        self.state = TrainState()
        self.stop = False
        self.best_values: Optional[Dict[str, torch.Tensor]] = None  # trainables of the best evaluation
        self.last_ckpt: Optional[str] = None
        self.meter = LoopMeter()  # wall time from here; training time and memory from the first step

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Every check and every load; nothing is written into the run directory before `accept`."""
        B.quiet_libraries()
        self.acc, self.mixed, self.sharded = D.run_accelerator(self.cfg,
                                                               preflight.run_dir(self.cfg, self.requested_output))
        self.main, self.ga = self.acc.is_main_process, int(self.tc.grad_accum)
        # model.dtype=auto and a 4-bit base's compute dtype, for this device: before a checkpoint's config is compared
        self.precision = settle(self.cfg.model, self.acc.device, self.mixed)
        self.plan = preflight.settle_output(self.cfg, self.acc, self.requested_output, self.user_overrides)
        self.writer = RunWriter(self.plan, self.main, self.run_log)
        self.output_dir, self.paths, self.resume_from = self.plan.run_dir, self.writer.paths, self.plan.resume_from
        self._setup_task()
        self._setup_model()
        self._setup_optimizer()
        self._setup_data()
        self._setup_schedule()
        self._prepare_task()
        self.rng = self.load_checkpoint(self.resume_from) if self.resume_from is not None else None
        self.accept()

    def accept(self) -> None:
        """The run is accepted: its directory and files (runs/writer.py), the trackers, the task's files."""
        self.writer.accept(self.cfg, self.hydra_files, self.state.jsonl_bytes if self.resume_from else None)
        self.acc.wait_for_everyone()
        self.trackers = Trackers(self.acc, self.cfg, self.plan.run_dir)
        if self.main:  # what _prepare_task computed
            self.task.store_prepared(self.output_dir)
        self.acc.wait_for_everyone()

    # ---- checkpoints (training/resume.py) -------------------------------------------------------
    def snapshot(self) -> Dict[str, torch.Tensor]:
        """The trainables' values held by this process (a sharded one's local shard: training/sharded.py)."""
        return S.snapshot(self.unwrapped, self.trainable_names)

    def restore(self, values: Dict[str, torch.Tensor]) -> None:
        S.restore(self.unwrapped, values)

    def load_checkpoint(self, path: str) -> Dict[str, Any]:
        return resume.load(self, path)

    def save_checkpoint(self) -> None:
        resume.save(self)

    # ---- training -------------------------------------------------------------------------------
    def train(self) -> None:
        self.progress = TrainingProgress(self.main and bool(self.tc.progress), f"{self.cfg.recipe_name} "
                                         f"[{self.cfg.method.name}]", self.total_steps, self.state.step)
        self.model.train()
        if self.rng is not None:  # the RNG streams (dropout, ...) as they were at the checkpoint
            ck.set_rng_state(*self.rng)
        self.meter.start(self.acc.device)
        self.first_step = self.state.step
        try:
            while self.state.step < self.total_steps and not self.stop:
                self._train_stream() if self.streaming else self._train_epoch()
        except BaseException:
            self.writer.close()
            raise
        finally:
            self.progress.stop()
        self.train_s = self.meter.train_seconds()
        self.peak_memory_mb = D.max_over_processes(self.acc, self.meter.memory.peak_mb())

    def _train_epoch(self) -> None:
        st, acc = self.state, self.acc
        it = iter(B.epoch_loader(self.train_set, self.batch_size, acc.num_processes, acc.process_index, self.tc,
                                 st.epoch, st.step_in_epoch * self.ga, self.collate))
        for k in range(st.step_in_epoch, self.steps_per_epoch):
            self.train_step([next(it) for _ in range(min(self.ga, self.n_micro - k * self.ga))])
            st.step, st.step_in_epoch = st.step + 1, k + 1
            self._after_step()
            if self.stop or st.step >= self.total_steps:
                return
        st.epoch += 1
        st.step_in_epoch = 0

    def _train_stream(self) -> None:
        """task.streaming: steps over windows drawn from the task's example stream, its position kept in
        TrainState.stream (saved with every checkpoint; a resumed run continues from it)."""
        st, acc = self.state, self.acc
        batches = TS.StreamBatches(self.train_set, self.batch_size, self.ga, acc.num_processes, acc.process_index,
                                   self.collate)
        for window in batches.windows(st.stream):
            self.train_step(window)
            st.step, st.epoch = st.step + 1, int(st.stream["epoch"])
            self._after_step()
            if self.stop or st.step >= self.total_steps:
                return

    def train_step(self, window: List[Dict[str, Any]]) -> None:
        """One optimizer step over the micro-batches of one accumulation window: the task's strategy turns them
        into gradients (frod_cli/tasks/steps.py), the loop syncs, checks, clips and steps."""
        acc = self.acc
        window = self.step.prepare(window)
        context = self.method.accumulation(self.unwrapped, len(window))
        # A method's window context hands its gradients over at the window's end, after the last backward:
        # the loop then syncs every gradient itself, once per window, instead of DDP's per-backward hooks.
        self.deferred_sync = acc.num_processes > 1 and not isinstance(context, contextlib.nullcontext)
        with context:
            outcome = self.step.run(window)
        self.window_loss += torch.stack([outcome.loss_sum, outcome.count])
        self.meter.count(outcome.examples * acc.num_processes)  # equal shards on every process
        if self.deferred_sync:  # the mean over processes, one flat all-reduce (FSDP's rule for its whole trainables)
            D.average_gradients(self.trainable_params, acc.num_processes)
        self._check_finite(outcome.nonfinite, outcome.bad_value)
        if float(self.cfg.optimizer.max_grad_norm) > 0:
            acc.clip_grad_norm_(self.trainable_params, float(self.cfg.optimizer.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def micro_batch(self, j: int, size: int) -> Any:
        """The context of micro-batch j of a window of `size` (frod_cli/tasks/steps.py): DDP's gradient sync runs
        after the last one only, and not at all when the loop syncs the window itself."""
        if not self.deferred_sync and j == size - 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.model)

    def _check_finite(self, bad: torch.Tensor, bad_value: torch.Tensor) -> None:
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")
        if float(bad) > 0:
            st = self.state
            where = f"checkpoint {self.last_ckpt}" if self.last_ckpt else "none (no checkpoint was saved before it)"
            raise NonFiniteLoss(f"the loss became {float(bad_value)} at step {st.step + 1} (epoch {st.epoch}): "
                                f"training stopped; last good checkpoint: {where}")

    def _after_step(self) -> None:
        """The schedule: a log line, an evaluation, a checkpoint (their time set aside from the throughput)."""
        st, tc = self.state, self.tc
        if st.step % int(tc.log_every) == 0 or st.step == self.total_steps:
            self._log_training()
        self.progress.advance(st.step)
        evaluated = st.step % self.eval_every == 0 or st.step == self.total_steps
        if evaluated:
            st.last_eval_step = st.step
            with self.meter.set_aside("evaluation"):
                self.stop = self.evaluate()
            if self.stop and self.main:
                log.info("early stopping at step %d (patience %d)", st.step, tc.early_stopping_patience)
        if evaluated or (int(tc.checkpoint_every) > 0 and st.step % int(tc.checkpoint_every) == 0):
            with self.meter.set_aside("checkpoint"):
                self.save_checkpoint()

    def _log_training(self) -> None:
        acc = self.acc
        tot = acc.reduce(self.window_loss, reduction="sum") if acc.num_processes > 1 else self.window_loss
        record = training_record(self, float(tot[0] / tot[1].clamp(min=1)))
        record.update(self.step.log_metrics())  # the strategy's own figures (every process: it may reduce)
        self.writer.write(record)
        self.trackers.log_training(record)
        self.progress.show(record)
        self.window_loss.zero_()

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> bool:
        """Evaluate on validation; keep the best checkpoint. True = stop early (patience spent)."""
        st, cfg = self.state, self.cfg
        result = self.evaluator.split(self.model, "validation")
        metrics, objective = result.metrics, cfg.task.objective
        if objective not in metrics:
            raise FrodCliError(f"task.objective {objective!r} is not among the metrics {sorted(metrics)}")
        improved = st.improves(metrics[objective], cfg.task.objective_mode)
        if improved:
            st.best, st.best_step, st.best_val, st.bad_evals = metrics[objective], st.step, metrics, 0
            self.best_values = self.snapshot()
            self.writer.predictions(result.records, "validation")
            if self.tc.save_adapter:
                S.save_adapter(self.method, self.unwrapped, str(self.paths.adapter), self.main, atomic_dir)
        else:
            st.bad_evals += 1
        self.writer.write({"step": st.step, "split": "validation", **metrics, "best": improved})
        if self.main:
            log.info("step %d validation %s%s", st.step, fmt_metrics(metrics), " (best)" if improved else "")
        self.trackers.log_evaluation("validation", metrics, st.step)
        patience = int(self.tc.early_stopping_patience)
        return patience > 0 and st.bad_evals >= patience

    # ---- the end --------------------------------------------------------------------------------
    def finalize(self) -> float:
        """The best checkpoint on validation and test, merged/, metrics.json; returns the objective."""
        st = self.state
        if st.last_eval_step != st.step:
            self.evaluate()
        self.restore(self.best_values or {})
        if self.tc.save_adapter and self.best_values is not None and not self.paths.adapter.is_dir():  # resumed
            S.save_adapter(self.method, self.unwrapped, str(self.paths.adapter), self.main, atomic_dir)
        results, test_majority = self._evaluate_best()
        merge_diff = merging.write_merged(self) if self.tc.save_merged else None
        final = final_metrics(self, results, test_majority, merge_diff)
        self.writer.finish(final, self.cfg, bool(self.tc.keep_checkpoints))
        self.trackers.finish(final)
        if self.sharded:  # the whole tensors (trainables, FRoD basis and pattern) still agree on every rank
            D.check_identical(self.acc, self.unwrapped, "end")
        # the recipe's references to the (sharded) model go before the shutdown collects it
        self.model = self.unwrapped = self.optimizer = self.scheduler = self.evaluator = None
        self.trainable_params = []
        D.shutdown(self.acc)
        self.writer.replace_finished_run()
        if self.main and self.tc.push_to_hub:
            push_finished_run(self.plan.final_dir, self.tc)
        return float(st.best) if st.best is not None else float("nan")

    def _evaluate_best(self):
        """Validation metrics as recorded at the best step; test metrics of the best checkpoint; the
        per-example predictions of both (tasks that produce them) in predictions.jsonl."""
        results: Dict[str, Any] = {"validation": self.state.best_val}
        test_majority = None
        if self.evaluator.has("test") and self.tc.eval_test:
            res = self.evaluator.split(self.model, "test")
            results["test"] = res.metrics
            test_majority = majority_accuracy(res.references)
            self.trackers.log_evaluation("test", res.metrics, self.state.step)
            self.writer.predictions(res.records, "test")
        return results, test_majority


def recipe_main(cfg: Any, output_dir: Optional[str] = None, user_overrides: Sequence[str] = (),
                hydra_files: Optional[Dict[str, Any]] = None, run_log: Optional[Any] = None) -> float:
    """`frod train`: set up, train, finalize; returns the validation objective of the best checkpoint (what
    the Optuna sweeper optimizes). output_dir: the default run directory (Hydra's run dir)."""
    recipe = FinetuneRecipe(cfg, output_dir, user_overrides, hydra_files, run_log)
    recipe.setup()
    recipe.train()
    return recipe.finalize()
