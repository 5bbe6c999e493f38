"""Training checkpoints: everything `frod train` needs to continue a run exactly where it stopped.

Layout (under the run directory; written by the main process only):

  checkpoints/step-00000012/
    trainable.safetensors   the trainable parameters (FRoD: lambda, S values, head; full: every parameter)
    best.safetensors        the trainable parameters of the best validation checkpoint so far
    optimizer.safetensors   the optimizer's state tensors, flattened as state.<param index>.<key>
    optimizer.json          the optimizer's non-tensor state and its param_groups
    scheduler.json          the LR scheduler's state_dict
    rng.safetensors         torch CPU (and CUDA) RNG states, numpy's key
    rng.json                the rest of numpy's state and Python's random state
    config.yaml             the composed config (to refuse resuming a run of another recipe)
    strategy.safetensors    the training step's own state (frod_cli/tasks/steps.py: e.g. a rollout buffer), if any:
    strategy.json           its tensors here, the rest as JSON
    state.json              step, epoch, batches consumed in the epoch, best so far, metrics.jsonl size

Every step directory is written to a temporary sibling and renamed into place, then older ones are
deleted: a kill at any moment leaves at least one complete checkpoint. Nothing is pickled: tensors
go through safetensors, everything else through JSON.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from frod_cli import FrodCliError, one_line
from frod_cli.runs.io import atomic_dir
from frod_cli.runs.reader import CHECKPOINTS, STATE_FILE, latest_checkpoint, step_dirs  # noqa: F401  (re-exported)

# Keys that may differ between a run and its resumption (they change no result).
RESUME_FREE_KEYS = {"resume", "output_dir", "train.progress", "train.num_workers", "train.cpu", "train.overwrite",
                    "train.keep_checkpoints", "train.checkpoint_every", "train.save_merged", "train.save_adapter",
                    "train.eval_test"}


# ---------------------------------------------------------------------------------------------
# Flattening (no pickle)
# ---------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"__tuple__": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return {"__float__": repr(v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint as JSON")


def _unjson(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_unjson(x) for x in v["__tuple__"])
        if set(v) == {"__float__"}:
            return float(v["__float__"])
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


def flatten_optimizer(sd: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """torch optimizer state_dict -> (tensors, JSON): state.<i>.<key> tensors, the rest as JSON."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = _jsonable(v)
    meta = {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars,
            "indices": [str(i) for i in sd["state"]]}
    return tensors, meta


def unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(_unjson(st))
    return {"state": state, "param_groups": _unjson(meta["param_groups"])}


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy.key"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).astype(np.int64))
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _jsonable(random.getstate())}
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["numpy.key"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    random.setstate(_unjson(meta["python"]))


# ---------------------------------------------------------------------------------------------
# Config comparison
# ---------------------------------------------------------------------------------------------
def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = d
    return out


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    a, b = _flat(saved), _flat(current)
    diffs = []
    # what names the run (recipe, method, task, model) first: the rest usually follows from it
    first = ("recipe_name", "method.name", "task.name", "model.name_or_path")
    for k in sorted(set(a) | set(b), key=lambda k: (first.index(k) if k in first else len(first), k)):
        if k in RESUME_FREE_KEYS or any(k.startswith(f + ".") for f in RESUME_FREE_KEYS):
            continue
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            diffs.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return diffs


def check_same_run(saved_cfg: Dict[str, Any], current_cfg: Dict[str, Any], where: str) -> None:
    diffs = config_differences(saved_cfg, current_cfg)
    if not diffs:
        return
    saved_recipe, cur_recipe = saved_cfg.get("recipe_name"), current_cfg.get("recipe_name")
    what = (f"a run of another recipe ({saved_recipe!r}, not {cur_recipe!r})" if saved_recipe != cur_recipe
            else "a run with another config")
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise FrodCliError(f"cannot resume: {where} holds {what}; differences: {'; '.join(diffs[:3])}{more}")


# ---------------------------------------------------------------------------------------------
# Save / find / load
# ---------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str, step: int, *, trainable: Dict[str, torch.Tensor],
                    best: Optional[Dict[str, torch.Tensor]], optimizer_sd: Dict[str, Any],
                    scheduler_sd: Dict[str, Any], state: Dict[str, Any], config: Dict[str, Any],
                    strategy: Optional[Dict[str, Any]] = None, keep: int = 2,
                    extra: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoints/step-<step>/ atomically; keep the newest `keep` complete checkpoints. extra(tmp): more
    files into the step directory before it is complete (the other processes' shards, training/sharded.py)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    opt_t, opt_meta = flatten_optimizer(optimizer_sd)
    rng_t, rng_meta = rng_state()
    path = os.path.join(run_dir, CHECKPOINTS, f"step-{step:08d}")

    def write(tmp: str) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  os.path.join(tmp, "trainable.safetensors"))
        if best is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in best.items()},
                      os.path.join(tmp, "best.safetensors"))
        save_file(opt_t, os.path.join(tmp, "optimizer.safetensors"))
        save_file(rng_t, os.path.join(tmp, "rng.safetensors"))
        for name, obj in (("optimizer.json", opt_meta), ("scheduler.json", _jsonable(scheduler_sd)),
                          ("rng.json", rng_meta)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f)
        OmegaConf.save(OmegaConf.create(config), os.path.join(tmp, "config.yaml"))
        if strategy:
            save_file({k: v.detach().cpu().contiguous() for k, v in strategy.items() if torch.is_tensor(v)},
                      os.path.join(tmp, "strategy.safetensors"))
            with open(os.path.join(tmp, "strategy.json"), "w", encoding="utf-8") as f:
                json.dump({k: _jsonable(v) for k, v in strategy.items() if not torch.is_tensor(v)}, f)
        if extra is not None:
            extra(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:  # last: marks it complete
            json.dump(_jsonable(state), f, indent=1)

    atomic_dir(path, write)
    for _, old in step_dirs(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def saved_config(ckpt_dir: str) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(ckpt_dir, "config.yaml")))


def load_checkpoint(ckpt_dir: str) -> Dict[str, Any]:
    """Read a step directory (safetensors + JSON only). Corrupt files are refused with one line."""
    from safetensors.torch import load_file

    out: Dict[str, Any] = {"path": ckpt_dir}
    try:
        out["trainable"] = load_file(os.path.join(ckpt_dir, "trainable.safetensors"))
        best = os.path.join(ckpt_dir, "best.safetensors")
        out["best"] = load_file(best) if os.path.exists(best) else None
        with open(os.path.join(ckpt_dir, "optimizer.json"), encoding="utf-8") as f:
            out["optimizer"] = unflatten_optimizer(load_file(os.path.join(ckpt_dir, "optimizer.safetensors")), json.load(f))
        with open(os.path.join(ckpt_dir, "scheduler.json"), encoding="utf-8") as f:
            out["scheduler"] = _unjson(json.load(f))
        with open(os.path.join(ckpt_dir, "rng.json"), encoding="utf-8") as f:
            out["rng"] = (load_file(os.path.join(ckpt_dir, "rng.safetensors")), json.load(f))
        with open(os.path.join(ckpt_dir, STATE_FILE), encoding="utf-8") as f:
            out["state"] = _unjson(json.load(f))
        out["strategy"] = {}
        if os.path.exists(os.path.join(ckpt_dir, "strategy.json")):
            with open(os.path.join(ckpt_dir, "strategy.json"), encoding="utf-8") as f:
                out["strategy"] = {**_unjson(json.load(f)), **load_file(os.path.join(ckpt_dir, "strategy.safetensors"))}
    except Exception as e:  # noqa: BLE001 - safetensors/json errors of a damaged file
        raise FrodCliError(f"checkpoint {ckpt_dir} is truncated or corrupt ({one_line(e, 200)})") from None
    return out
