"""`frod`: our FRoD implementation (frod_cli.frod). Groups: sparse (S values), scale (lambda), head."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Optional

import torch
from torch import nn

from frod_cli import FrodCliError
from frod_cli.methods.base import Method, MethodConfig, register_method

log = logging.getLogger("frod.methods.frod")
ACCUMULATE = ("auto", "window", "micro_batch")


@dataclass
class FrodKeys(MethodConfig):
    """The keys both FRoD implementations read: ours (`frod`) and PEFT's (`peft_frod`)."""

    sparse_rate: float = 0.01  # fraction of the n^2 entries of S that train (a fixed, seeded pattern)
    regularization: float = 1e-3  # pi of the regularized HO-GSVD
    frod_seed: int = 0  # seeds the sparse pattern


def check_frod_keys(cfg: Any) -> None:
    """Refuse, before any work, what neither implementation can train."""
    if not 0.0 < float(cfg.sparse_rate) < 1.0:
        raise FrodCliError(f"method.sparse_rate must lie in (0, 1), got {cfg.sparse_rate}")


@dataclass
class FrodMethodConfig(FrodKeys):
    frod_mode: str = "auto"  # auto | materialize | project: how dW x is computed (frod_cli/frod/layer.py)
    store_u: bool = False  # keep U_i (one more copy of each adapted weight) instead of recomputing it
    basis_dtype: str = "float32"  # float32 | float64: precision of the decomposition
    # auto | memory | streamed: decompose each category's stack at once (fast) or one layer block at a time (a few
    # n x n matrices of memory, whatever the depth); auto: memory where it fits the device's free memory.
    basis_build: str = "auto"
    # auto | window | micro_batch: build dW once per accumulation window (exact) or per micro-batch.
    # auto: window when train.grad_accum > 1 and the window's buffers fit the free memory.
    accumulate: str = "auto"
    # Keep each category's decomposition on disk and reuse it on the same base weights (sweeps, compare,
    # repeated runs): $FROD_BASIS_CACHE, else $FROD_CACHE/basis (frod_cli/paths.py); `frod cache` lists and clears it.
    basis_cache: bool = True


@register_method("frod", config=FrodMethodConfig)
class FrodMethod(Method):
    def __init__(self, cfg: Any, task: Any = None, model_cfg: Any = None):
        super().__init__(cfg, task, model_cfg)
        check_frod_keys(cfg)
        if cfg.accumulate not in ACCUMULATE:
            raise FrodCliError(f"method.accumulate must be one of {', '.join(ACCUMULATE)}, got {cfg.accumulate!r}")
        from frod_cli.frod.config import BASIS_BUILDS

        if cfg.basis_build not in BASIS_BUILDS:
            raise FrodCliError(f"method.basis_build must be one of {', '.join(BASIS_BUILDS)}, got {cfg.basis_build!r}")
        self.window_choice: Optional[str] = None
        self.eval_logged = False
        self.basis: Optional[Dict[str, Any]] = None  # how adapt got the bases (describe)

    def frod_config(self, model: nn.Module):
        from frod_cli.frod import FrodConfig

        c = self.cfg
        return FrodConfig(
            target_modules=self.paths_regex(self.resolve_targets(model)),
            sparse_rate=float(c.sparse_rate),
            regularization=float(c.regularization),
            seed=int(c.frod_seed),
            modules_to_save=self.modules_to_save(),
            layers_to_transform=None,  # already applied by resolve_targets
            basis_dtype=c.basis_dtype,
            basis_build=c.basis_build,
            mode=c.frod_mode,
            store_u=bool(c.store_u),
        )

    def adapt(self, model: nn.Module) -> nn.Module:
        """The bases are computed on `self.device` (the run's accelerator, set by the recipe) and go through
        the basis cache unless method.basis_cache=false."""
        from frod_cli.frod import apply_frod, basis_report

        self.count_base(model)
        from frod_cli.paths import basis_cache_dir

        cache_dir = basis_cache_dir() if self.cfg.basis_cache else None
        model = apply_frod(model, self.frod_config(model), device=self.device, cache_dir=cache_dir)
        report = basis_report(model)
        hits = sum(r["source"] == "cache" for r in report)
        streamed = sum(r["source"] == "computed" and r["build"] == "streamed" for r in report)
        self.basis = {"categories": len(report), "cache_hits": hits, "computed": len(report) - hits,
                      "streamed": streamed,
                      "compute_s": round(sum(r["seconds"] for r in report if r["source"] == "computed"), 3),
                      "processes": len({r["rank"] for r in report}), "cache_dir": cache_dir}
        return model

    def param_groups(self, model: nn.Module) -> Dict[str, List[nn.Parameter]]:
        from frod_cli.frod import param_groups

        return {k: list(v) for k, v in param_groups(model).items() if len(v)}

    def save_adapter(self, model: nn.Module, directory: str) -> None:
        from frod_cli.frod import save_adapter

        save_adapter(model, directory)

    def load_adapter(self, base_model: nn.Module, directory: str) -> nn.Module:
        from frod_cli.frod import load_adapter

        self.count_base(base_model)
        return load_adapter(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        """On a 4-bit base: the adapted layers come back holding dequant(W_q) + dW_i, the untouched 4-bit layers
        are dequantized and the quantization config dropped, so merged/ is a plain model in model.dtype."""
        from frod_cli.frod import merge_and_unload
        from frod_cli.models import dequantize_model

        return dequantize_model(merge_and_unload(model))

    def merge_into(self, model: nn.Module, base_model: nn.Module) -> nn.Module:
        from frod_cli.frod import merge_into

        return merge_into(model, base_model)

    # ---- evaluation (issue 21) ------------------------------------------------------------------------
    def evaluation_context(self, model: nn.Module) -> ContextManager:
        """Within one evaluation or generation each adapted layer may hold W_i + dW_i (the merged model's
        matrix) instead of rebuilding dW_i or projecting in every call, as far as half the free memory allows;
        freed when it ends (frod_cli.frod.evaluation_cache). Logged the first time."""
        from frod_cli.frod import evaluation_cache, evaluation_cache_bytes

        free = _free_memory(model)
        budget = None if free is None else int(0.5 * free)
        if not self.eval_logged:
            need = evaluation_cache_bytes(model)
            self.eval_logged = True
            log.info("evaluation cache: W + dW held within each evaluation for %s of the adapted layers "
                     "(%.1f MiB for all; free memory %s)", "all" if budget is None or need <= budget else "some",
                     need / 2**20, "unknown" if free is None else f"{free / 2**20:.0f} MiB")
        return evaluation_cache(model, max_bytes=budget)

    def before_sharding(self, model: nn.Module) -> None:
        """Inside an evaluation a FrodLinear may keep W + dW (m x n) for the next call without gradients: under FSDP
        that is a whole copy of a sharded weight for the length of the evaluation, so it is dropped after each
        forward."""
        from frod_cli.frod.layer import FrodLinear

        for m in model.modules():
            if isinstance(m, FrodLinear):
                m.register_forward_hook(lambda module, args, output: module.drop_cache())

    # ---- the starting model (GRPO's KL penalty) -----------------------------------------------------------
    def reference_context(self, model: nn.Module) -> ContextManager:
        """Inside, every FRoD layer computes its base layer alone: at initialization W_i' = W_i exactly (dW_i = 0),
        so this is the starting model, with no second copy of any weight (on a 4-bit base, the 4-bit base)."""
        from frod_cli.frod import disable_adapter

        why = self.reference_refusal()
        if why:
            raise FrodCliError(why)
        return disable_adapter(model)

    def reference_refusal(self) -> Optional[str]:
        if self.modules_to_save():
            return (f"method.modules_to_save={self.modules_to_save()} trains those modules whole, and switching "
                    f"the FRoD layers off leaves them trained: the starting model (the reference of task.beta > 0) "
                    f"is not inside the trained one; use task.beta=0 or no modules_to_save")
        return None

    # ---- accumulation windows (issue 12) ------------------------------------------------------------
    def accumulation(self, model: nn.Module, micro_batches: int) -> ContextManager:
        if self.window_choice is None:
            self.window_choice = self._choose_window(model, micro_batches)
        if self.window_choice != "window":
            return contextlib.nullcontext()
        from frod_cli.frod import accumulate

        return accumulate(model, micro_batches=micro_batches)

    def _choose_window(self, model: nn.Module, micro_batches: int) -> str:
        from frod_cli.frod import window_buffer_bytes

        mode = self.cfg.accumulate
        if mode != "auto":
            return mode
        if micro_batches <= 1:
            return "micro_batch"
        need = window_buffer_bytes(model)  # W + dW and the float32 gradient sum per layer, at most
        free = _free_memory(model)
        choice = "window" if free is None or need < 0.5 * free else "micro_batch"
        log.info("method.accumulate=auto: %s (window buffers %.1f MiB, free memory %s)", choice, need / 2**20,
                 "unknown" if free is None else f"{free / 2**20:.0f} MiB")
        return choice

    def describe(self) -> Dict[str, Any]:
        details: Dict[str, Any] = {"accumulate": self.window_choice or "micro_batch"}
        if self.basis is not None:
            details["basis"] = self.basis
        return details


def _free_memory(model: nn.Module) -> Optional[int]:
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks PyTorch has reserved but not handed out are free to it as well
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no reading: assume it fits
        return None
