"""The parts of a `frod train` run that FinetuneRecipe (training/recipe.py) builds before its loop, in the order
`FinetuneRecipe.setup` calls them: the task and its data, the base model adapted by the method, the optimizer, the
encoded data and the model prepared by Accelerate (sharded under train.fsdp), the schedule and the step's strategy,
and the task's pass with the starting model. Every check and every load; nothing is written here."""
from __future__ import annotations

import logging
import time

import torch

from frod_cli.export.peft_frod import peft_format_note
from frod_cli.training import builders as B
from frod_cli.training import distributed as D
from frod_cli.training import dtypes, preflight
from frod_cli.training import streaming as TS
from frod_cli.training.evaluation import Evaluator
from frod_cli.training.state import TrainState

log = logging.getLogger("frod.train")


class RecipeSetup:
    """The setup steps of FinetuneRecipe (its attributes: cfg, tc, acc, main, sharded, mixed, ga, output_dir)."""

    def _setup_task(self) -> None:
        from accelerate.utils import set_seed

        set_seed(int(self.tc.seed))
        self.task = B.build_task(self.cfg.task, int(self.tc.seed))
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
            dtypes.enable_gradient_checkpointing(model, cfg.model.name_or_path)
        self.counts = self.method.trainable_summary(model)
        self.model = model
        note = peft_format_note(model)
        if note and self.main:
            log.warning(note)
        if not self.sharded:  # a sharded run checks once its weights are in place (_setup_data)
            self.fingerprints = D.check_identical(self.acc, self.model, "start")
        if self.main:
            preflight.check_free_space(self.output_dir, preflight.disk_need(model, bool(self.tc.save_merged)))

    def _setup_optimizer(self) -> None:
        groups = self.method.param_groups(self.model)
        self.optimizer = B.build_optimizer(self.cfg.optimizer, groups)
        if self.main:
            B.log_trainables(self.cfg, self.counts, groups, self.adapt_s)

    def _setup_data(self) -> None:
        tc = self.tc
        with self.acc.main_process_first():
            self.encoded = B.encode_data(self.task, self.data, self.preprocessor)
        self.collate = self.task.collate(self.preprocessor)
        self.train_set = self.encoded["train"]
        self.streaming = TS.is_stream(self.train_set)  # task.streaming: read while training (training/streaming.py)
        self.model, self.optimizer = self.acc.prepare(self.wrap_model(self.model), self.optimizer)
        if self.sharded:
            self.fingerprints = D.check_identical(self.acc, self.model, "start")
        self.evaluator = Evaluator(self.task, self.acc, self.encoded, self.collate, int(tc.eval_batch_size),
                                   int(tc.num_workers), method=self.method)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The hook for a wrapper around the model before Accelerate prepares it (sharding). With
        train.fsdp, Accelerate's prepare shards it (FSDP2); here it gets its policy: the layer classes
        that become units and the trainables that stay whole (training/distributed.py)."""
        moved = dtypes.float32_trainables(model, self.method)
        if moved and self.main:
            log.info("model.dtype=%s: %s (trained in float32)", self.cfg.model.dtype, ", ".join(moved))
        if self.sharded:
            self.acc.set_model_policy(model, self.tc.fsdp.wrap, self.method.trains_everything)
            self.method.before_sharding(model)
        return model

    def _setup_schedule(self) -> None:
        tc, acc = self.tc, self.acc
        examples = None if self.streaming else len(self.train_set)
        self.batch_size = B.fill_batch_size(int(tc.batch_size), acc.num_processes, examples, self.main)
        self.n_micro, self.steps_per_epoch, self.total_steps = B.schedule_lengths(
            tc, examples, self.batch_size, acc.num_processes, acc.process_index)
        self.scheduler, self.warmup = B.build_scheduler(self.optimizer, self.cfg.optimizer, self.total_steps)
        self.eval_every = int(tc.eval_every) if int(tc.eval_every) > 0 else self.steps_per_epoch
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable_names = [n for n, p in self.unwrapped.named_parameters() if p.requires_grad]
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.window_loss = torch.zeros(2, device=acc.device)  # loss sum, count since the last log line
        self.state = TrainState(num_processes=acc.num_processes, total_steps=self.total_steps)
        self.deferred_sync = False  # train_step: whether the loop syncs a window's gradients itself
        self.step = self.task.training_step(self)  # the task's strategy for one optimizer step (tasks/steps.py)

    def _prepare_task(self) -> None:
        """Task.prepare_training: once, on every process, before the first step and before a resumed run's values
        are restored, so the model is still the starting model of every method (preference: the reference
        log-probabilities). The task may add columns to the encoded splits; no evaluation loader exists yet."""
        with self.method.evaluation_context(self.model):  # forward passes only, like an evaluation
            self.task_prep = self.task.prepare_training(self.model, self.encoded, self.acc, self.output_dir,
                                                        int(self.tc.eval_batch_size), self.resume_from is not None)
        self.train_set = self.encoded["train"]
