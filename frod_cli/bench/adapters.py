"""The benchmarks' method names, built through the method registry the CLI uses (frod_cli.methods:
`build_method(method_config(name, ...))`, then `Method.adapt`), so a benchmark measures what `frod train` runs.

Names (`--methods`, `--q-methods`):
- `full`; `lora`, `dora`, `pissa` (r = alpha = --lora-r, dropout 0); `vera` (its defaults); `peft_frod`
  (PEFT's FRoD: --sparse-rate, seeded by --seed);
- our FRoD: `frod[:<mode>[+u]][:micro_batch|:window]`, mode auto|materialize|project (method.frod_mode), `+u`
  keeping U_i (method.store_u), `:window` accumulating through method.accumulate=window (`:micro_batch`, the
  default, is the plain path). No basis cache: every build decomposes.
- `frod` on a shape-only basis (`adapt_shape_only`): for shapes whose decomposition takes minutes on a CPU.

`peft_frod:offload` (PEFT's runtime_offload_base_weight) is gone: the registry has no key for it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from frod_cli.bench.common import refuse

ACCUMULATION_MODES = ("micro_batch", "window")
FROD_MODES = ("auto", "materialize", "project")
LORA_FAMILY = ("lora", "dora", "pissa")
PLAIN = ("full", "vera", "peft_frod") + LORA_FAMILY
FROD_NAMES = "frod[:auto|materialize|project][+u][:micro_batch|:window]"


def frod_available() -> Optional[str]:
    """None when our FRoD is registered and its core imports, else the reason it is not."""
    try:
        import frod_cli.frod  # noqa: F401
        from frod_cli.methods import available

        if "frod" not in available():
            return "the method registry has no frod method"
    except Exception as e:  # noqa: BLE001
        return f"frod_cli.frod is not importable ({type(e).__name__}: {e})"
    return None


def is_our_frod(name: str) -> bool:
    """Our FRoD (frod, frod:<mode>[...]), as opposed to PEFT's peft_frod and the other baselines."""
    return name == "frod" or name.startswith("frod:")


def frod_accumulation(name: str) -> Optional[str]:
    """"window" or "micro_batch" for our FRoD methods (micro_batch unless the name ends in :window), else None."""
    if not is_our_frod(name):
        return None
    return "window" if name.split(":")[-1] == "window" else "micro_batch"


def parse_frod_method(name: str) -> Dict[str, Any]:
    """{"mode": ..., "store_u": ...} of an our-FRoD name; a name it cannot read is refused."""
    parts = [p for p in name.split(":")[1:] if p not in ACCUMULATION_MODES]
    if len(parts) > 1:
        refuse(f"unknown frod method {name!r}: use {FROD_NAMES}")
    spec = parts[0] if parts else "auto"
    store_u = spec.endswith("+u")
    mode = (spec[:-2] if store_u else spec) or "auto"
    if mode not in FROD_MODES:
        refuse(f"unknown frod mode in {name!r}: use {FROD_NAMES}")
    return {"mode": mode, "store_u": store_u}


def check_names(names: Sequence[str]) -> None:
    """Refuse, before anything is built, a name no benchmark method has."""
    for name in names:
        if is_our_frod(name):
            parse_frod_method(name)
        elif name == "peft_frod:offload":
            refuse("peft_frod:offload is gone (PEFT's runtime_offload_base_weight has no key in the method "
                   "registry the benchmark builds through); use peft_frod")
        elif name not in PLAIN:
            refuse(f"unknown method {name!r}; the benchmark's methods: {', '.join(PLAIN)}, {FROD_NAMES}")


def registry_config(name: str, args, targets: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
    """The registry key and the method.* values of a benchmark name (module docstring)."""
    check_names([name])
    values: Dict[str, Any] = {"target_modules": list(targets)}
    if name in LORA_FAMILY:
        values.update(r=int(args.lora_r), alpha=float(args.lora_r), dropout=0.0)
    if name == "peft_frod" or is_our_frod(name):
        values.update(sparse_rate=float(args.sparse_rate), frod_seed=int(args.seed))
    if not is_our_frod(name):
        return name, values
    kind = parse_frod_method(name)
    values.update(frod_mode=kind["mode"], store_u=kind["store_u"], accumulate=frod_accumulation(name),
                  basis_cache=False)
    return "frod", values


def build(name: str, args, targets: Sequence[str], **overrides: Any):
    """The registry's Method for a benchmark name (`overrides`: more method.* values)."""
    from frod_cli.methods import build_method, method_config

    key, values = registry_config(name, args, targets)
    return build_method(method_config(key, **{**values, **overrides}))


def adapt(name: str, model: torch.nn.Module, args, targets: Sequence[str]):
    """(the adapted model, its Method): `Method.adapt` as `frod train` calls it, on the model's device."""
    method = build(name, args, targets)
    return method.adapt(model), method


# ---- a shape-only FRoD basis ------------------------------------------------------------------------------
# On LLaMA-7B shapes the HO-GSVD takes 2-4 minutes per category on two CPU cores and changes neither memory nor
# step time. The shape-only basis, V = V^-T = I and sigma_i = the column norms of W_i (so U_i = W_i diag(1/sigma_i)),
# has the same tensors, sizes and operations; it is written into a temporary basis cache under the keys of the
# model's categories, and `frod` adapts through the registry reading that cache: the real apply_frod path.
def adapt_shape_only(model: torch.nn.Module, args, targets: Sequence[str]):
    """(the model adapted by `frod` on the shape-only basis, its Method); every category must come from the
    cache written here (a change of the cache's keys or of where the method finds its cache is an error)."""
    import tempfile
    from unittest import mock

    with tempfile.TemporaryDirectory(prefix="frod-bench-basis-") as directory, \
            mock.patch.dict("os.environ", {"FROD_BASIS_CACHE": directory}):
        method = build("frod", args, targets, basis_cache=True)
        written = write_shape_only_basis(method.frod_config(model), model, directory)
        model = method.adapt(model)
        basis = method.describe()["basis"]
    if basis["cache_hits"] != written or basis["categories"] != written:
        raise RuntimeError(f"the shape-only basis was not read back: {written} categories written to "
                           f"{directory}, the method read {basis}")
    return model, method


def write_shape_only_basis(config, model: torch.nn.Module, directory: str) -> int:
    """One cache entry per category of `config` on `model` (the key apply_frod computes), holding the
    shape-only basis in config.basis_dtype; returns how many."""
    from frod_cli.frod import find_targets
    from frod_cli.frod.adapter import group_categories
    from frod_cli.frod.basis import CategoryBasis
    from frod_cli.frod.cache import BasisCache, entry_key
    from frod_cli.frod.layer import weight_of

    cache, dtype = BasisCache(directory), getattr(torch, config.basis_dtype)
    groups = group_categories(find_targets(model, config))
    for key, members in groups.items():
        names = [n for n, _ in members]
        weights: List[torch.Tensor] = [weight_of(m).detach() for _, m in members]
        eye = torch.eye(weights[0].shape[1], dtype=dtype)
        sigma = [torch.linalg.vector_norm(w.float(), dim=0).to(dtype).cpu() for w in weights]
        basis = CategoryBasis(V=eye, V_inv_T=eye.clone(), sigma=sigma, U=None, rank_deficient=False)
        entry = entry_key(key, names, weights, config.regularization, config.basis_dtype)
        if not cache.store(entry, basis, {"category": key, "layers": names, "basis": "shape-only (benchmark)"}):
            raise RuntimeError(f"cannot write the shape-only basis into {directory}")
        del weights
    return len(groups)
