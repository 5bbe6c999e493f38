"""The fine-tuning recipe (Accelerate), in the spirit of torchtune's FTRecipeInterface: `setup`,
`load_checkpoint`, `train`, `evaluate`, `save_checkpoint`, `finalize`, with the run's state in attributes
and in one `TrainState`. It knows nothing about FRoD: the method gives it parameter groups, a context
around each accumulation window, and saves/merges; the task gives it data, loss and evaluation.

Run directory (written by the main process only, each file atomically; see frod_cli.runs):
  .hydra/            the composed config and the overrides (Hydra)
  metrics.jsonl      one line per log step (step, loss, lr, throughput, memory) and per evaluation
  metrics.json       final metrics of the best checkpoint (validation, test), trainable params, wall time
  predictions.jsonl  per-example predictions of the best checkpoint (tasks that evaluate by generation)
  adapter/           the best checkpoint's adapter (method.save_adapter)
  merged/            a plain transformers model + preprocessor (AutoModelFor...from_pretrained)
  loss.png           the loss curve
  trackers/          experiment-tracker files (train.log_with, e.g. TensorBoard event files)
  checkpoints/       step-N/: trainables, optimizer, scheduler, RNG, TrainState (training/checkpoint.py; under
                     FSDP with method=full each process's shards in shards/: training/sharded.py; for
                     resume=<run dir>; removed at the end unless train.keep_checkpoints=true)

Hooks for what wraps this loop: `wrap_model` (sharding), `Method.accumulation` (a context around one
optimizer step's micro-batches), `Task.evaluate` (a task's own evaluation, e.g. generation),
`Task.prepare_training` (a task's pass with the starting model before the first step, e.g. preference
tuning's reference log-probabilities) and `Task.store_prepared` (its file, once the run is accepted).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from frod_cli import FrodCliError
from frod_cli.config import apply_per_method
from frod_cli.console import fmt_metrics, print_final, progress_bar
from frod_cli.precision import settle
from frod_cli.runs import JsonlWriter, RunPaths, atomic_dir, atomic_write_json, atomic_write_text, recover_atomic_dir
from frod_cli.runs.plots import plot_loss_curve
from frod_cli.share.card import describe_hardware, write_run_cards
from frod_cli.share.hub import check_push_settings, push_finished_run
from frod_cli.tasks.sources import describe_source
from frod_cli.training import builders as B
from frod_cli.training import checkpoint as ck
from frod_cli.training import distributed as D
from frod_cli.training import preflight
from frod_cli.training import sharded as S
from frod_cli.training import streaming as TS
from frod_cli.training.evaluation import (Evaluator, check_batch, majority_accuracy, merge_and_check, model_outputs,
                                          save_merged)
from frod_cli.training.state import TrainState
from frod_cli.training.trackers import Trackers

log = logging.getLogger("frod.train")


class NonFiniteLoss(FrodCliError):
    pass


class FinetuneRecipe:
    """One `frod train` run. `recipe_main` shows the order of the calls."""

    def __init__(self, cfg: Any, output_dir: Optional[str], user_overrides: Sequence[str] = (),
                 hydra_files: Optional[Dict[str, Any]] = None, run_log: Optional[Any] = None):
        """output_dir: where the run goes unless cfg.resume or cfg.output_dir names it (Hydra's run dir).
        hydra_files: Hydra's part of the .hydra/ files of a new run ({hydra_config, overrides}), written with the
        config as it runs when the run is accepted; run_log: a frod_cli.runs.directory.RunLog holding the log
        records until train.log opens."""
        self.t_start = time.time()
        self.user_overrides, self.hydra_files, self.run_log = list(user_overrides), hydra_files, run_log
        apply_per_method(cfg, user_overrides)
        preflight.apply_task_defaults(cfg.task, user_overrides)
        preflight.apply_user_data(cfg.task, user_overrides)
        preflight.validate(cfg)
        check_push_settings(cfg.train)  # train.push_to_hub: refused now, not after the training
        from omegaconf import OmegaConf

        OmegaConf.resolve(cfg)
        self.cfg, self.tc = cfg, cfg.train
        self.requested_output = output_dir
        self.state = TrainState()
        self.stop = False
        self.best_values: Optional[Dict[str, torch.Tensor]] = None  # trainables of the best evaluation
        self.last_ckpt: Optional[str] = None
        self.resume_from: Optional[str] = None
        self.jsonl: Optional[JsonlWriter] = None
        self.best_records: List[Dict[str, Any]] = []

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Every check and every load; nothing is written into the run directory before `accept`."""
        B.quiet_libraries()
        self._setup_accelerator()
        # model.dtype=auto and a 4-bit base's compute dtype, for this device: before a checkpoint's config is compared
        self.precision = settle(self.cfg.model, self.acc.device, self.mixed)
        self._setup_output()
        self._setup_task()
        self._setup_model()
        self._setup_optimizer()
        self._setup_data()
        self._setup_schedule()
        self._prepare_task()
        self.rng = self.load_checkpoint(self.resume_from) if self.resume_from is not None else None
        self.accept()
        self._store_task_files()

    def accept(self) -> None:
        """The run is accepted: its directory, .hydra/ (a new run), train.log, metrics.jsonl, the trackers."""
        from frod_cli.runs import directory as rd

        plan = self.plan
        if self.main:
            os.makedirs(plan.run_dir, exist_ok=True)
            if plan.restart:
                rd.clear_failed_run(plan.run_dir)
            if self.resume_from is not None:
                for d in (self.paths.adapter, self.paths.merged):
                    recover_atomic_dir(str(d))
                self._truncate_log(self.state.jsonl_bytes)
            elif self.hydra_files is not None:  # the config as it runs: per_method, task.type, your data applied
                rd.write_hydra_files(plan.run_dir, config=self.cfg, **self.hydra_files)
            if self.run_log is not None:
                self.run_log.open(os.path.join(plan.run_dir, "train.log"))
            self.jsonl = JsonlWriter(str(self.paths.log))
        self.acc.wait_for_everyone()
        self.trackers = Trackers(self.acc, self.cfg, plan.run_dir)

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        tc = self.tc
        self.mixed = tc.mixed_precision
        if self.mixed != "no" and (tc.cpu or not torch.cuda.is_available()):
            log.info("mixed_precision=%s needs a GPU; training in float32", self.mixed)
            self.mixed = "no"
        # Gradient accumulation is the loop's own (train_step), so resuming never depends on Accelerate's
        # counters; trackers are Accelerate's (train.log_with).
        kwargs = dict(mixed_precision=self.mixed, cpu=bool(tc.cpu),
                      **Trackers.accelerator_kwargs(self.cfg, preflight.run_dir(self.cfg, self.requested_output)))
        # train.fsdp: Accelerate's FSDP2 plugin, on CPU launches too (training/distributed.py)
        self.sharded = D.check_fsdp_config(self.cfg)
        self.acc = D.make_accelerator(tc.fsdp, **kwargs) if self.sharded else Accelerator(**kwargs)
        self.main = self.acc.is_main_process
        self.ga = int(tc.grad_accum)

    def _setup_output(self) -> None:
        """Where the run goes (preflight.plan_output, on the main process; every process gets its answer)."""
        from accelerate.utils import broadcast_object_list

        cfg = self.cfg
        target = preflight.run_dir(cfg, self.requested_output)
        if target is None:
            raise FrodCliError("no output directory (run through `frod train` or set output_dir=...)")
        if cfg.resume and cfg.output_dir and os.path.abspath(cfg.output_dir) != os.path.abspath(cfg.resume):
            raise FrodCliError("resume continues in the run directory it names: drop output_dir")
        out: List[Any] = [None]
        if self.main:
            try:
                preflight.check_output_dir(target)
                out = [preflight.plan_output(cfg, target, self.user_overrides)]
            except FrodCliError as e:  # every process stops with the main process's refusal (none waits on it)
                out = [e]
        if self.acc.num_processes > 1:  # one output directory for all processes: the main process's
            broadcast_object_list(out)
        if isinstance(out[0], FrodCliError):
            raise out[0]
        self.plan = out[0]
        self.output_dir = self.plan.run_dir
        self.paths = RunPaths.of(self.output_dir)
        self.resume_from = self.plan.resume_from

    def _setup_task(self) -> None:
        from accelerate.utils import set_seed

        seed = int(self.tc.seed)
        set_seed(seed)
        self.task = B.build_task(self.cfg.task, seed)
        if self.task.streaming:
            TS.check_config(self.cfg)  # before any data or model is read
        self.data = B.load_task_data(self.task)

    def _setup_model(self) -> None:
        cfg = self.cfg
        options = D.load_options(cfg, self.mixed) if self.sharded else {}  # sharded: where and how it loads
        model, self.preprocessor = B.load_base(cfg.model, self.task, int(self.tc.seed), **options)
        self.method = B.build_method(cfg.method, self.task, cfg.model)
        self.method.device = self.acc.device  # FRoD decomposes on the accelerator the run trains on
        t0 = time.time()
        model = self.method.adapt(model)
        self.adapt_s = time.time() - t0
        if self.tc.gradient_checkpointing:
            self._enable_gradient_checkpointing(model)
        self.counts = self.method.trainable_summary(model)
        self.model = model
        if not self.sharded:  # a sharded run checks once its weights are in place (_setup_data)
            self._check_identical_ranks()
        if self.main:
            preflight.check_free_space(self.output_dir, preflight.disk_need(model, bool(self.tc.save_merged)))

    def _enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        base = getattr(model, "get_base_model", lambda: model)()
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise FrodCliError(f"model {self.cfg.model.name_or_path} does not support gradient checkpointing")
        # Non-reentrant checkpointing: frozen inputs need no requires_grad trick, and the FRoD layers
        # inside a checkpointed block simply run their forward again.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _check_identical_ranks(self) -> None:
        """Every rank must hold the same adapter (FRoD: basis and pattern) and the same initial values."""
        self.fingerprints = self._rank_fingerprints(self.model)
        if len(set(self.fingerprints)) > 1:
            raise FrodCliError(f"the adapted model differs between processes ({len(set(self.fingerprints))} "
                               "variants): check that every rank loads the same base model and seed")

    def _rank_fingerprints(self, model: torch.nn.Module) -> List[str]:
        """state_fingerprint (buffers and trainables) of every rank."""
        if self.acc.num_processes == 1:
            return [B.state_fingerprint(model)]
        return D.rank_fingerprints(self.acc, model)

    def _setup_optimizer(self) -> None:
        groups = self.method.param_groups(self.model)
        self.optimizer = B.build_optimizer(self.cfg.optimizer, groups)
        if self.main:
            c = self.counts
            quant = str(self.cfg.model.get("quantization", "none") or "none")
            log.info("%s%s on %s with %s: %s trainable of %s (%.3f%%); groups %s; adapt %.1fs",
                     self.cfg.model.name_or_path, "" if quant == "none" else f" (frozen weights in {quant.upper()})",
                     self.cfg.task.name, self.cfg.method.name,
                     f"{c['trainable_params']:,}", f"{c['total_params']:,}", c["trainable_percent"],
                     {k: sum(p.numel() for p in v) for k, v in groups.items()}, self.adapt_s)

    def _setup_data(self) -> None:
        tc = self.tc
        with self.acc.main_process_first():
            self.encoded = B.encode_data(self.task, self.data, self.preprocessor)
        self.collate = self.task.collate(self.preprocessor)
        self.train_set = self.encoded["train"]
        self.streaming = TS.is_stream(self.train_set)  # task.streaming: read while training (training/streaming.py)
        self.model, self.optimizer = self.acc.prepare(self.wrap_model(self.model), self.optimizer)
        if self.sharded:
            self._check_identical_ranks()
        self.evaluator = Evaluator(self.task, self.acc, self.encoded, self.collate, int(tc.eval_batch_size),
                                   int(tc.num_workers), method=self.method)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The hook for a wrapper around the model before Accelerate prepares it (sharding). With
        train.fsdp, Accelerate's prepare shards it (FSDP2); here it gets its policy: the layer classes
        that become units and the trainables that stay whole (training/distributed.py)."""
        self._float32_trainables(model)
        if self.sharded:
            self.acc.set_model_policy(model, self.tc.fsdp.wrap, self.method.trains_everything)
            self.method.before_sharding(model)
        return model

    def _float32_trainables(self, model: torch.nn.Module) -> None:
        """Frozen weights in model.dtype (bfloat16, float16), trainables in float32, so their updates and
        AdamW's state are float32 too. The methods' own trainables already are (FRoD's lambda and S, PEFT's
        adapter weights); what is left are the trained modules (the task head, method.modules_to_save):
        each computes in float32 (its inputs cast up), and hands back the model's dtype, except a task
        head, whose float32 logits feed the loss. Full fine-tuning keeps the weights as loaded."""
        from frod_cli.frod.targets import inside

        low = (torch.bfloat16, torch.float16)
        if self.method.trains_everything:
            return
        owners = [(n, m) for n, m in model.named_modules()
                  if any(p.requires_grad and p.dtype in low for p in m.parameters(recurse=False))]
        if not owners:
            return
        model_dtype = next(p.dtype for p in model.parameters() if p.dtype in low)
        heads = self.method.modules_to_save()

        def cast(x: Any, dtype: torch.dtype) -> Any:
            if torch.is_tensor(x):
                return x.to(dtype) if x.is_floating_point() else x
            if isinstance(x, (tuple, list)):
                return type(x)(cast(v, dtype) for v in x)
            if isinstance(x, dict):
                return {k: cast(v, dtype) for k, v in x.items()}
            return x

        with torch.no_grad():
            for name, module in owners:
                for p in module.parameters(recurse=False):
                    p.data = p.data.float()  # the same Parameter: the optimizer already holds it
                for key, b in module._buffers.items():
                    if b is not None and b.dtype in low:
                        module._buffers[key] = b.float()
                module.register_forward_pre_hook(lambda m, args, kwargs: (cast(args, torch.float32),
                                                                          cast(kwargs, torch.float32)),
                                                 with_kwargs=True)
                if not inside(name, heads):
                    module.register_forward_hook(lambda m, args, out: cast(out, model_dtype))
        if self.main:
            log.info("model.dtype=%s: %s (trained in float32)", self.cfg.model.dtype, ", ".join(n for n, _ in owners))

    def _setup_schedule(self) -> None:
        tc, acc = self.tc, self.acc
        self.batch_size = self._batch_size()
        n = int(tc.max_steps) * self.ga if self.streaming else len(
            B.epoch_batches(len(self.train_set), self.batch_size, acc.num_processes, acc.process_index, int(tc.seed), 0))
        if n == 0:
            raise FrodCliError(f"the training split ({len(self.train_set)} examples) cannot give each of the "
                               f"{acc.num_processes} processes one example per batch")
        self.n_micro = n
        self.steps_per_epoch = max(1, math.ceil(n / self.ga))
        self.total_steps = (int(tc.max_steps) if int(tc.max_steps) > 0
                            else max(1, math.ceil(float(tc.epochs) * self.steps_per_epoch)))
        self.scheduler, self.warmup = B.build_scheduler(self.optimizer, self.cfg.optimizer, self.total_steps)
        self.eval_every = int(tc.eval_every) if int(tc.eval_every) > 0 else self.steps_per_epoch
        self.samples_window = self.samples_trained = 0  # examples really trained on (short batches counted)
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable_names = [n for n, p in self.unwrapped.named_parameters() if p.requires_grad]
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.window_loss = torch.zeros(2, device=acc.device)  # loss sum, count since the last log line
        self.state = TrainState(num_processes=acc.num_processes, total_steps=self.total_steps)
        self.deferred_sync = False  # train_step: whether the loop syncs a window's gradients itself
        self.step = self.task.training_step(self)  # the task's strategy for one optimizer step (tasks/steps.py)

    # ---- the task's pass with the starting model (Task.prepare_training) --------------------------
    def _prepare_task(self) -> None:
        """Once, on every process, before the first step and before a resumed run's values are restored: the
        model is still the starting model of every method (preference: the reference log-probabilities).
        The task may add columns to the encoded splits; no evaluation loader exists yet to miss them."""
        with self.method.evaluation_context(self.model):  # forward passes only, like an evaluation
            self.task_prep = self.task.prepare_training(self.model, self.encoded, self.acc, self.output_dir,
                                                        int(self.tc.eval_batch_size), self.resume_from is not None)
        self.train_set = self.encoded["train"]

    def _store_task_files(self) -> None:
        """What `_prepare_task` computed goes into the run directory once the run is accepted."""
        if self.main:
            self.task.store_prepared(self.output_dir)
        self.acc.wait_for_everyone()

    def _batch_size(self) -> int:
        """train.batch_size, clamped (with a log line) to what the training split can fill: a batch larger than
        the data would silently be the whole split, and every throughput figure would be off."""
        if self.streaming:  # a stream fills any batch (it starts another pass when one ends)
            return int(self.tc.batch_size)
        asked, procs, n = int(self.tc.batch_size), self.acc.num_processes, len(self.train_set)
        if asked * procs <= n:
            return asked
        size = max(1, n // procs)
        if self.main:
            log.warning("train.batch_size=%d%s is larger than the training split (%d examples): batches of %d",
                        asked, f" x {procs} processes" if procs > 1 else "", n, size)
        return size

    # ---- checkpoints ----------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, torch.Tensor]:
        """The trainables' values held by this process (a sharded one's local shard: training/sharded.py)."""
        return S.snapshot(self.unwrapped, self.trainable_names)

    def restore(self, values: Dict[str, torch.Tensor]) -> None:
        S.restore(self.unwrapped, values)

    def load_checkpoint(self, path: str) -> Dict[str, Any]:
        """Continue from checkpoints/step-N/: trainables, optimizer, scheduler, TrainState (read only: metrics.jsonl
        is cut back to what it held then when the run is accepted). Returns the saved RNG states (set just
        before training)."""
        saved = S.with_shards(ck.load_checkpoint(path), self.unwrapped, self.optimizer, self.acc)
        missing = set(self.trainable_names) - set(saved["trainable"])
        if missing:
            raise FrodCliError(f"checkpoint {path} does not fit this model: no values for {sorted(missing)[:3]}")
        st = TrainState.from_dict(saved["state"])
        if st.num_processes != self.acc.num_processes:
            raise FrodCliError(f"checkpoint {path} was written by {st.num_processes} processes; resume it with "
                               f"the same number (this launch has {self.acc.num_processes})")
        self.restore(saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step.load_state_dict(saved["strategy"])
        self.state, self.best_values, self.last_ckpt = st, saved["best"], path
        from frod_cli.runs import read_jsonl

        self.best_records = [r for r in read_jsonl(str(self.paths.predictions)) if r.get("split") == "validation"]
        if self.main:
            self.window_loss += torch.tensor(st.window_loss, device=self.acc.device)
        return saved["rng"]

    def _truncate_log(self, size: int) -> None:
        """metrics.jsonl as it was at the checkpoint: what was logged after it is dropped."""
        log_file = str(self.paths.log)
        if os.path.exists(log_file) and os.path.getsize(log_file) > size:
            with open(log_file, "r+b") as f:
                f.truncate(size)

    def save_checkpoint(self) -> None:
        acc, st = self.acc, self.state
        win = acc.reduce(self.window_loss.clone(), reduction="sum") if acc.num_processes > 1 else self.window_loss
        # sharded trainables (method=full under FSDP): every process stages its shards, rank 0 moves them in
        trainable, best, optimizer_sd, extra = S.checkpoint_parts(
            self.unwrapped, self.snapshot(), self.best_values, self.optimizer.state_dict(), self.output_dir,
            st.step, acc)
        if self.main:
            st.window_loss = [float(x) for x in win.tolist()]
            st.jsonl_bytes = os.path.getsize(self.paths.log)
            self.last_ckpt = ck.save_checkpoint(
                self.output_dir, st.step, trainable=trainable, best=best, optimizer_sd=optimizer_sd,
                scheduler_sd=self.scheduler.state_dict(), state=st.to_dict(), config=preflight.plain_config(self.cfg),
                strategy=self.step.state_dict(), extra=extra)
        acc.wait_for_everyone()

    # ---- training -------------------------------------------------------------------------------
    def train(self) -> None:
        rng = self.rng
        self.progress = progress_bar(self.main and bool(self.tc.progress))
        if self.progress:
            self.ptask = self.progress.add_task(f"{self.cfg.recipe_name} [{self.cfg.method.name}]",
                                                total=self.total_steps, completed=self.state.step,
                                                loss="-", lr="-", sps="-")
            self.progress.start()
        self.model.train()
        if rng is not None:  # the RNG streams (dropout, ...) as they were at the checkpoint
            ck.set_rng_state(*rng)
        self.t_train = self.t_window = time.time()
        self.first_step = self.state.step
        try:
            while self.state.step < self.total_steps and not self.stop:
                self._train_stream() if self.streaming else self._train_epoch()
        except BaseException:
            if self.jsonl is not None:
                self.jsonl.close()
            raise
        finally:
            if self.progress:
                self.progress.stop()
        self.train_s = time.time() - self.t_train

    def _train_epoch(self) -> None:
        from torch.utils.data import DataLoader

        st, tc, acc = self.state, self.tc, self.acc
        batches = B.epoch_batches(len(self.train_set), self.batch_size, acc.num_processes, acc.process_index,
                                  int(tc.seed), st.epoch)
        loader = DataLoader(self.train_set, batch_sampler=batches[st.step_in_epoch * self.ga:],
                            collate_fn=self.collate, num_workers=int(tc.num_workers),
                            generator=torch.Generator())  # the loader's own seed draws leave the global RNG alone
        it = iter(loader)
        for k in range(st.step_in_epoch, self.steps_per_epoch):
            window = [next(it) for _ in range(min(self.ga, self.n_micro - k * self.ga))]
            self.train_step(window)
            st.step += 1
            st.step_in_epoch = k + 1
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
            st.step += 1
            st.epoch = int(st.stream["epoch"])
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
        seen = outcome.examples * acc.num_processes  # equal shards on every process
        self.samples_window += seen
        self.samples_trained += seen
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
        st, tc = self.state, self.tc
        if st.step % int(tc.log_every) == 0 or st.step == self.total_steps:
            self._log_training()
        if self.progress:
            self.progress.update(self.ptask, completed=st.step)
        evaluated = st.step % self.eval_every == 0 or st.step == self.total_steps
        if evaluated:
            st.last_eval_step = st.step
            if self.evaluate():
                if self.main:
                    log.info("early stopping at step %d (patience %d)", st.step, tc.early_stopping_patience)
                self.stop = True
        ckpt_every = int(tc.checkpoint_every)
        if evaluated or (ckpt_every > 0 and st.step % ckpt_every == 0):
            self.save_checkpoint()

    def _log_training(self) -> None:
        acc, st = self.acc, self.state
        tot = acc.reduce(self.window_loss, reduction="sum") if acc.num_processes > 1 else self.window_loss
        mean_loss = float(tot[0] / tot[1].clamp(min=1))
        sps = self.samples_window / max(time.time() - self.t_window, 1e-9)
        elapsed = time.time() - self.t_train
        eta = elapsed / max(st.step - self.first_step, 1) * (self.total_steps - st.step)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        record = {"step": st.step, "epoch": round(st.epoch + st.step_in_epoch / self.steps_per_epoch, 4),
                  "loss": mean_loss, "lr": lrs, "samples_per_s": sps, "elapsed_s": elapsed, "eta_s": eta,
                  "memory_mb": B.memory_mb(acc.device)}
        record.update(self.step.log_metrics())  # the strategy's own figures (every process: it may reduce)
        if self.main:
            self.jsonl.write(record)
        self.trackers.log_training(record)
        if self.progress:
            self.progress.update(self.ptask, loss=f"{mean_loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}",
                                 sps=f"{sps:.0f}")
        self.window_loss.zero_()
        self.t_window, self.samples_window = time.time(), 0

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> bool:
        """Evaluate on validation; keep the best checkpoint. True = stop early (patience spent)."""
        st, cfg = self.state, self.cfg
        result = self.evaluator.split(self.model, "validation")
        metrics = result.metrics
        objective = cfg.task.objective
        if objective not in metrics:
            raise FrodCliError(f"task.objective {objective!r} is not among the metrics {sorted(metrics)}")
        improved = st.improves(metrics[objective], cfg.task.objective_mode)
        if improved:
            st.best, st.best_step, st.best_val, st.bad_evals = metrics[objective], st.step, metrics, 0
            self.best_values = self.snapshot()
            self._write_predictions(result.records, "validation")
            if self.tc.save_adapter:
                S.save_adapter(self.method, self.unwrapped, str(self.paths.adapter), self.main, atomic_dir)
        else:
            st.bad_evals += 1
        if self.main:
            self.jsonl.write({"step": st.step, "split": "validation", **metrics, "best": improved})
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
        merge_diff = self._write_merged() if self.tc.save_merged else None
        final = self._final_metrics(results, test_majority, merge_diff)
        if self.main:
            self.jsonl.close()
            atomic_write_json(str(self.paths.metrics), final)
            write_run_cards(self.output_dir, self.plan.final_dir, config=self.cfg)  # README.md model cards in merged/, adapter/
            plot_loss_curve(str(self.paths.log), str(self.paths.loss_png),
                            title=f"{self.cfg.recipe_name}: {self.cfg.method.name} on {final['data']}")
            print_final(final, self.plan.final_dir)
            if not self.tc.keep_checkpoints:
                shutil.rmtree(os.path.join(self.output_dir, ck.CHECKPOINTS), ignore_errors=True)
        self.trackers.finish(final)
        if self.sharded:
            self._check_identical_trainables()
        # the recipe's references to the (sharded) model go before the shutdown collects it
        self.model = self.unwrapped = self.optimizer = self.scheduler = self.evaluator = None
        self.trainable_params = []
        D.shutdown(self.acc)
        if self.main and self.plan.replaces:
            self._replace_finished_run()
        if self.main and self.tc.push_to_hub:
            push_finished_run(self.plan.final_dir, self.tc)
        return float(st.best) if st.best is not None else float("nan")

    def _replace_finished_run(self) -> None:
        """train.overwrite: the finished new run takes the old run's place (every file of this run closed first)."""
        from frod_cli.runs import directory as rd

        if self.run_log is not None:
            self.run_log.close()
        rd.swap_into_place(self.plan.run_dir, self.plan.final_dir)
        log.info("train.overwrite: %s now holds this run", self.plan.final_dir)

    def _check_identical_trainables(self) -> None:
        """After a sharded run: the whole tensors (trainables, FRoD basis and pattern) still agree on every rank."""
        prints = self._rank_fingerprints(self.unwrapped)
        if len(set(prints)) > 1:
            raise FrodCliError(f"train.fsdp: the trainables differ between processes at the end of training "
                               f"({len(set(prints))} variants)")

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
            self._write_predictions(res.records, "test")
        return results, test_majority

    def _write_predictions(self, records: Optional[List[Dict[str, Any]]], split: str) -> None:
        """predictions.jsonl: the best checkpoint's validation records, then its test records."""
        if records is None:
            return
        if split == "validation":
            self.best_records = [{"split": split, **r} for r in records]
            rows = self.best_records
        else:
            rows = self.best_records + [{"split": split, **r} for r in records]
        if self.main:
            atomic_write_text(str(self.paths.predictions), "".join(json.dumps(r, default=str) + "\n" for r in rows))

    def _write_merged(self) -> Optional[float]:
        """merged/ and the merge check's largest |merged - unmerged| output on the first validation examples."""
        batch = check_batch(self.encoded["validation"], self.collate, min(8, int(self.tc.eval_batch_size)),
                            self.acc.device)
        if self.sharded:
            return self._write_merged_sharded(batch)
        if not self.main:
            return None
        plain = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        merged, diff = merge_and_check(self.method, plain, batch, self.task)
        save_merged(merged, self.preprocessor, str(self.paths.merged), dtype=self._model_dtype())
        return diff

    def _model_dtype(self) -> torch.dtype:
        """model.dtype: merged/ is written in it (trained heads included, which train in float32)."""
        return getattr(torch, str(self.cfg.model.dtype))

    def _write_merged_sharded(self, batch: Dict[str, Any]) -> Optional[float]:
        """merged/ of a sharded run. The weights exist only as shards, so rank 0 rebuilds the model on CPU:
        the base as loaded at the start (frozen since) plus the adapter of the current values (basis and
        pattern read back, not recomputed; FRoD checks the base's fingerprint), merges and writes that.
        The merge check compares the merged model with the sharded model's own outputs (every rank runs
        that forward: it gathers the weights)."""
        self.model.eval()
        with torch.no_grad():
            trained = model_outputs(self.model, batch, self.task).cpu()
        diff = None
        plain = self._rebuild_on_cpu()  # every process takes part (sharded trainables are gathered)
        if self.main:
            cpu_batch = B.to_device(batch, torch.device("cpu"))
            with torch.no_grad():
                rebuilt = model_outputs(plain, cpu_batch, self.task)
                merged = self.method.merge(plain)
                merged.eval()
                after = model_outputs(merged, cpu_batch, self.task)
            log.info("train.fsdp: merged/ rebuilt on CPU; max |rebuilt - sharded| output %.3g",
                     float((rebuilt - trained).abs().max()))
            save_merged(merged, self.preprocessor, str(self.paths.merged), dtype=self._model_dtype())
            diff = float((after - trained).abs().max())
        self.acc.wait_for_everyone()
        return diff

    def _rebuild_on_cpu(self) -> Optional[torch.nn.Module]:
        """The trained model, unsharded, on rank 0's CPU (None elsewhere): the base loaded as in setup + an adapter
        of the current values (gathered from the shards where they are sharded)."""
        import tempfile

        cfg = self.cfg
        with tempfile.TemporaryDirectory(prefix="frod-merge-") as d:
            adapter = os.path.join(d, "adapter")
            S.save_adapter(self.method, self.unwrapped, adapter, self.main, lambda path, fill: fill(path))
            if not self.main:
                return None
            model, _, _ = B.load_adapted(cfg.model, cfg.method, self.task, int(self.tc.seed), adapter)
        return model.eval()

    def _final_metrics(self, results: Dict[str, Any], test_majority: Optional[float],
                       merge_diff: Optional[float]) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        return {
            "recipe": cfg.recipe_name, "model": cfg.model.name_or_path, "task": cfg.task.name,
            "data": describe_source(cfg.task),
            "method": cfg.method.name, "objective": cfg.task.objective, "objective_mode": cfg.task.objective_mode,
            "objective_value": st.best, "best_step": st.best_step, **results, **self.counts,
            "steps": st.step, "epochs": round(st.step / self.steps_per_epoch, 4),
            "samples_per_s": self.samples_trained / max(self.train_s, 1e-9),
            "train_time_s": self.train_s, "adapt_time_s": self.adapt_s, "wall_time_s": time.time() - self.t_start,
            "peak_memory_mb": B.memory_mb(self.acc.device), "merge_max_abs_diff": merge_diff,
            "test_majority_class_accuracy": test_majority, "num_processes": self.acc.num_processes,
            "rank_fingerprints": self.fingerprints, "resumed_from": self.resume_from,
            "mixed_precision": self.mixed, "method_details": self.method.describe(),
            "task_preparation": self.task_prep, "data_counts": self._data_counts(),
            "hardware": describe_hardware(self.acc.device, self.acc.num_processes),
            **self.precision.record(),  # compute_dtype; on a CPU run its capability and what it emulates
        }

    def _data_counts(self) -> Optional[Dict[str, Any]]:
        """What the task read (per split and per source: rows, malformed, truncated, dropped, training examples);
        a streamed run adds what its stream gave (training/streaming.py)."""
        counts = self.task.data_stats()
        if self.streaming and counts is not None:
            counts["stream"] = TS.summary(self.state.stream, list(getattr(self.train_set, "sources", [])))
        return counts


def recipe_main(cfg: Any, output_dir: Optional[str] = None, user_overrides: Sequence[str] = (),
                hydra_files: Optional[Dict[str, Any]] = None, run_log: Optional[Any] = None) -> float:
    """`frod train`: set up, train, finalize; returns the validation objective of the best checkpoint (what
    the Optuna sweeper optimizes). output_dir: the default run directory (Hydra's run dir)."""
    recipe = FinetuneRecipe(cfg, output_dir, user_overrides, hydra_files, run_log)
    recipe.setup()
    recipe.train()
    return recipe.finalize()
