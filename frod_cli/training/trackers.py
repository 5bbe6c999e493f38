"""Experiment trackers through Accelerate (`train.log_with=[tensorboard]`, wandb, mlflow, or any tracker
Accelerate knows and finds installed). They get the composed config as hyperparameters, the training
log lines (loss, per-group learning rates, throughput, memory, and a training strategy's own figures) and every
evaluation; file-based trackers
write under <run dir>/trackers (`tensorboard --logdir runs/`). Adding a tracker Accelerate does not know
is one class of Accelerate's `GeneralTracker`, passed the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from frod_cli import FrodCliError

# tracker name -> (Accelerate's availability check, the package to install)
KNOWN = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "comet_ml": ("is_comet_ml_available", "comet-ml"),
    "aim": ("is_aim_available", "aim"),
    "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "trackio": ("is_trackio_available", "trackio"),
}
TRACKER_DIR = "trackers"
# the loop's own keys of a training log line (frod_cli/training/recipe.py _log_training)
_LOOP_KEYS = {"step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s", "eta_s", "memory_mb"}


def requested(cfg: Any) -> List[str]:
    """train.log_with, checked: every name known to Accelerate and its package installed."""
    import accelerate.utils as au

    names = [str(n) for n in (cfg.train.log_with or [])]
    for name in names:
        if name not in KNOWN:
            raise FrodCliError(f"train.log_with: unknown tracker {name!r}; known: {', '.join(KNOWN)}")
        check, package = KNOWN[name]
        if not getattr(au, check)():
            raise FrodCliError(f"train.log_with: tracker {name!r} is not installed (pip install {package})")
    return names


def flat_hparams(node: Any, prefix: str = "") -> Dict[str, Any]:
    """The config as flat scalar hyperparameters (lists and None as strings), as trackers expect."""
    out: Dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The run's trackers (none unless train.log_with names some); every call is a no-op without them."""

    def __init__(self, accelerator: Any, cfg: Any, run_dir: Any = None):
        from omegaconf import OmegaConf

        self.acc = accelerator
        self.names = requested(cfg)
        if self.names and run_dir:  # the directory the run writes in (train.overwrite: not the final one yet)
            pc = accelerator.project_configuration
            pc.project_dir = pc.logging_dir = str(Path(run_dir) / TRACKER_DIR)
        if self.names:
            config = flat_hparams(OmegaConf.to_container(cfg, resolve=True))
            accelerator.init_trackers(str(cfg.recipe_name), config=config)

    @staticmethod
    def accelerator_kwargs(cfg: Any, run_dir: Any) -> Dict[str, Any]:
        """What Accelerator() needs for the trackers: their names and the directory of file-based ones."""
        names = requested(cfg)
        if not names:
            return {}
        kwargs: Dict[str, Any] = {"log_with": names}
        if run_dir:
            kwargs["project_dir"] = str(Path(run_dir) / TRACKER_DIR)
        return kwargs

    def log_training(self, record: Dict[str, Any]) -> None:
        if not self.names:
            return
        values = {"train/loss": record["loss"], "train/samples_per_s": record["samples_per_s"],
                  "train/peak_memory_mb": record["peak_memory_mb"],
                  "train/current_memory_mb": record["current_memory_mb"], "train/epoch": record["epoch"]}
        values.update({f"train/lr/{group}": lr for group, lr in record["lr"].items()})
        # a training strategy's own figures (e.g. GRPO's rewards, clip fractions: Task.training_step)
        values.update({f"train/{k}": v for k, v in record.items()
                       if k not in _LOOP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.acc.log(values, step=int(record["step"]))

    def log_evaluation(self, split: str, metrics: Dict[str, float], step: int) -> None:
        if self.names:
            self.acc.log({f"{split}/{k}": v for k, v in metrics.items()}, step=int(step))

    def finish(self, final: Dict[str, Any]) -> None:
        if self.names:
            value = final.get("objective_value")  # None when nothing was evaluated; 0.0 is a value
            self.acc.log({"final/objective_value": float("nan") if value is None else value,
                          "final/trainable_percent": final["trainable_percent"]}, step=int(final["steps"]))
