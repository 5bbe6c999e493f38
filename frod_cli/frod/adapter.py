"""Apply, merge, save and load FRoD adapters on any torch model with nn.Linear / GPT-2 Conv1D layers."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .atomic import atomic_dir
from .basis import sparse_pattern
from .build import build_bases, world_and_rank
from .cache import BasisCache
from .config import FrodConfig, FrodError
from .layer import FrodCategory, FrodLinear, is_4bit, is_conv1d, quantization_of, weight_of, weight_shape
from .sources import checkpoint_sources
from .targets import describe_linear_roles, find_linear_targets, is_linear, matches, role_of

ADAPTER_FORMAT = "frod-adapter"
ADAPTER_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
STATE_ATTR = "frod_adapter"  # the submodule holding the shared category tensors

log = logging.getLogger("frod.basis")


class FrodState(nn.Module):
    """Registered on the adapted model: the config, the categories (shared tensors live here once) and
    the fingerprint of the base weights the adapter was built on."""

    def __init__(self, config: FrodConfig, categories: List[FrodCategory], fingerprint: str):
        super().__init__()
        self.config = config
        self.categories = nn.ModuleList(categories)
        self.fingerprint = fingerprint
        self.basis_report: List[dict] = []  # apply_frod's account of each category (basis_report)

    def forward(self, x):
        # Registered as a child so model.to() moves the shared tensors once; when the root is an
        # nn.Sequential it is also called as the last stage, where it must pass its input through.
        return x


# ---- finding targets and categories ---------------------------------------------------------------
def _index_parts(name: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def find_targets(model: nn.Module, config: FrodConfig) -> List[Tuple[str, nn.Module]]:
    found = find_linear_targets(model, config.target_modules, exclude=config.modules_to_save,
                                layers_to_transform=config.layers_to_transform, skip=(FrodLinear,))
    if not found:
        raise FrodError(f"target_modules {config.target_modules!r} match no linear layer; linear layers here: "
                        f"{describe_linear_roles(model)}")
    return found


def group_categories(targets: List[Tuple[str, nn.Module]]) -> Dict[str, List[Tuple[str, nn.Module]]]:
    """Category = (role, in-dim), members in block order; categories sorted by key (a fixed order)."""
    groups: Dict[str, List[Tuple[str, nn.Module]]] = {}
    for name, module in targets:
        n = weight_shape(module)[1]
        groups.setdefault(f"{role_of(name)}|in={n}", []).append((name, module))
    for key, members in groups.items():
        members.sort(key=lambda nm: (_index_parts(nm[0]), nm[0]))
        idx = [_index_parts(n) for n, _ in members]
        if len(set(idx)) != len(idx):
            raise FrodError(f"category {key!r} has two layers at the same block index: {[n for n, _ in members]}")
    return dict(sorted(groups.items()))


def fingerprint_weights(layers: List[Tuple[str, nn.Module]]) -> str:
    """A hash of the adapted base weights: shapes plus a strided sample of values, rounded to bfloat16 so
    the same base loaded in float32 or bfloat16 matches while another model does not."""
    h = hashlib.sha256()
    for name, module in sorted(layers, key=lambda nm: nm[0]):
        W = weight_of(module).detach()
        flat = W.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel()), device=flat.device).long()
        # float32 linspace rounds its last point up past numel - 1 on large layers (11008 x 4096: index
        # 45088768 of 45088768): clamped, which leaves every fingerprint of a smaller layer as it was
        idx.clamp_(max=flat.numel() - 1)
        sample = flat[idx].to(torch.bfloat16).float().cpu()
        h.update(f"{name}:{tuple(W.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()



def base_quantization(layers) -> Optional[str]:
    """"nf4" / "fp4" when the adapted layers' base is 4-bit, None for a plain one (recorded with the adapter)."""
    kinds = {quantization_of(layer.base_layer) for layer in layers}
    return kinds.pop() if len(kinds) == 1 else (None if not kinds else "mixed")


def _check_base(meta: dict, targets: List[Tuple[str, nn.Module]], path, strict: bool) -> None:
    """Refuse a base quantized otherwise than the one the adapter was built on, then (strict) another base."""
    saved = meta.get("base_quantization")
    kinds = {quantization_of(m) for _, m in targets}
    here = kinds.pop() if len(kinds) == 1 else "mixed"
    if saved != here:
        raise FrodError(f"adapter at {path} was built on a base with quantization={saved or 'none'}, this base has "
                        f"quantization={here or 'none'}: load the base as it was trained or pass allow_other_base=True")
    if strict and fingerprint_weights(targets) != meta["fingerprint"]:
        raise FrodError(f"adapter at {path} was built on a different base model (weight fingerprint mismatch)")

def weight_holders(targets: List[Tuple[str, nn.Module]]) -> Optional[List[int]]:
    """The ranks of a distributed launch whose target weights are loaded, when some rank's are on the meta device
    (train.fsdp.load_on_rank0: it builds the model's structure only); None when every rank holds them."""
    world, rank = world_and_rank()
    if world == 1:
        return None
    import torch.distributed as dist

    from .build import comm_device

    flags = torch.zeros(world, dtype=torch.int64, device=comm_device(None))
    flags[rank] = int(not any(m.weight.is_meta for _, m in targets))
    dist.all_reduce(flags)
    holders = [r for r in range(world) if int(flags[r])]
    if not holders:
        raise FrodError("no process holds the base weights to build the FRoD bases from")
    return None if len(holders) == world else holders


def shared_fingerprint(targets: List[Tuple[str, nn.Module]], holders: Optional[List[int]]) -> str:
    """fingerprint_weights, computed where the weights are: a rank holding none gets the first holder's."""
    if holders is None:
        return fingerprint_weights(targets)
    import torch.distributed as dist

    mine = [fingerprint_weights(targets) if world_and_rank()[1] in holders else None]
    dist.broadcast_object_list(mine, src=holders[0])
    return mine[0]


# ---- apply ---------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _state(model: nn.Module) -> Optional[FrodState]:
    st = getattr(model, STATE_ATTR, None)
    return st if isinstance(st, FrodState) else None


def frod_layers(model: nn.Module) -> Iterator[Tuple[str, FrodLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, FrodLinear):
            yield name, module


def _install(model: nn.Module, config: FrodConfig, categories: List[FrodCategory],
             members: Dict[str, List[Tuple[str, nn.Module]]], per_layer: Dict[str, dict], fingerprint: str) -> nn.Module:
    """Swap every target for a FrodLinear and freeze all but FRoD values and modules_to_save."""
    for p in model.parameters():
        p.requires_grad_(False)
    for cat in categories:
        for name, module in members[cat.key]:
            data = per_layer[name]
            layer = FrodLinear(module, cat, data["sigma"], U_t=data.get("U_t"), mode=config.mode)
            if "lambda" in data:
                with torch.no_grad():
                    layer.frod_lambda.copy_(data["lambda"])
                    layer.frod_s.copy_(data["s"])
            _set_module(model, name, layer)
    # the category tensors follow the model's device; they stay float32 like the trainables
    device = next(iter(per_layer.values()))["sigma"].device
    model.add_module(STATE_ATTR, FrodState(config, categories, fingerprint).to(device))
    for name, module in model.named_modules():
        if config.modules_to_save and matches(name, config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def apply_frod(model: nn.Module, config: FrodConfig, *, device=None, cache_dir=None, weights_from=None) -> nn.Module:
    """Adapt `model` in place: one shared basis and sparse pattern per category, a FrodLinear per target.
    The adapted model's outputs equal the base model's exactly until the FRoD values change.

    device: where the decompositions run (the accelerator the run trains on), one category at a time;
        the factors are placed where the model's weights are. None: where the weights are.
    cache_dir: a directory of the basis cache (cache.py); a category found there is not recomputed, one
        computed is stored. None: no cache.
    weights_from: a checkpoint directory (model.safetensors or a sharded index) whose files the bases are built
        from, read lazily one row block at a time (sources.checkpoint_sources), instead of the model's modules.
        It must hold the weights the model holds (the same bytes once cast to the model's dtype).
    config.basis_build: "memory", "streamed" or "auto" (build.choose_build); the log says which ran.
    In a distributed launch (torch.distributed initialized, more than one process) this is a collective:
    the categories are split over the ranks and broadcast (build.py), so every rank must call it."""
    if _state(model) is not None:
        raise FrodError("this model already carries a FRoD adapter; merge_and_unload it or start from the base model")
    config.validate()
    targets = find_targets(model, config)
    groups = group_categories(targets)
    holders = weight_holders(targets)
    fingerprint = shared_fingerprint(targets, holders)
    t0 = time.perf_counter()
    describe = {"base": str(getattr(model, "name_or_path", "") or type(model).__name__),
                "base_fingerprint": fingerprint[:16]}
    sources = None if weights_from is None else checkpoint_sources(groups, weights_from)
    bases, report = build_bases(groups, config.regularization, config.basis_dtype, fingerprint, device=device,
                                cache=None if cache_dir is None else BasisCache(cache_dir), describe=describe,
                                build=config.basis_build, sources=sources,
                                holders=None if sources is not None else holders)  # files: any rank reads them
    categories, per_layer = [], {}
    for key, members in groups.items():
        basis = bases.pop(key)
        rows, cols = sparse_pattern(basis.V.shape[0], config.sparse_rate, config.seed, key)
        device_here = basis.V.device
        cat = FrodCategory(key, basis.V, basis.V_inv_T, rows.to(device_here), cols.to(device_here))
        categories.append(cat)
        for i, (name, module) in enumerate(members):
            data = {"sigma": basis.sigma[i].float()}
            if basis.U is not None:
                data["U_t"] = basis.U[i].T.float()
            per_layer[name] = data
        inert = sum(int((s == 0).sum()) for s in basis.sigma)
        if inert:
            warnings.warn(f"FRoD category {key}: {inert} basis directions have sigma = 0 (zero or wide layers) "
                          "and cannot change their layer", stacklevel=2)
    _install(model, config, categories, groups, per_layer, fingerprint)
    if config.store_u:
        for _, layer in frod_layers(model):
            if layer.frod_U_t is None and layer.base_layer.weight.is_meta:  # its values come with the weights
                layer.frod_U_t = torch.empty(layer.in_features, layer.out_features, device="meta")
            elif layer.frod_U_t is None:
                layer.frod_U_t = layer.U_t().detach().contiguous()
    _state(model).basis_report = report
    _log_build(report, time.perf_counter() - t0, cache_dir)
    return model


def basis_report(model: nn.Module) -> List[dict]:
    """How `apply_frod` got each category's basis: category, layers, n, source ("computed" or "cache"),
    build ("memory" or "streamed": how it was, or would have been, decomposed), rank (the process that built
    it), seconds and cpu_s (wall and process CPU seconds of the decomposition),
    hash_s (cache key), load_s / store_s (reading / writing the cache entry), cache_cpu_s (CPU seconds of the
    cache's part), device_peak_bytes.
    Empty for an adapter read back by load_adapter (nothing was built)."""
    state = _state(model)
    if state is None:
        raise FrodError("this model carries no FRoD adapter")
    return list(state.basis_report)


def _log_build(report: List[dict], seconds: float, cache_dir) -> None:
    if world_and_rank()[1] != 0:
        return
    hits = [r for r in report if r["source"] == "cache"]
    computed = [r for r in report if r["source"] == "computed"]
    ranks = {r["rank"] for r in report}
    peak = max((r["device_peak_bytes"] for r in report), default=0)
    streamed = sum(r.get("build") == "streamed" for r in computed)
    how = f" ({streamed} streamed, {len(computed) - streamed} in memory)" if computed else ""
    log.info("FRoD basis: %d categories, %d from the cache%s, %d computed%s in %.1f s%s%s; ready in %.1f s",
             len(report), len(hits), f" ({cache_dir})" if cache_dir is not None else "", len(computed), how,
             sum(r["seconds"] for r in computed), f" over {len(ranks)} processes" if len(ranks) > 1 else "",
             f", peak device memory {peak / 2**30:.2f} GiB (one category)" if peak else "", seconds)


# ---- training helpers ----------------------------------------------------------------------------------
def param_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Trainable parameters by role, for per-group learning rates: S values, lambda, everything else."""
    sparse, scale, seen = [], [], set()
    for _, layer in frod_layers(model):
        for p, bucket in ((layer.frod_s, sparse), (layer.frod_lambda, scale)):
            if p.requires_grad:
                bucket.append(p)
            seen.add(id(p))
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = {"sparse": sparse, "scale": scale, "head": head}
    return {k: v for k, v in groups.items() if v}


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block the FRoD layers compute the base layers' outputs."""
    layers = [layer for _, layer in frod_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, b in zip(layers, before):
            layer.disabled = b


def merge(model: nn.Module) -> nn.Module:
    for _, layer in frod_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in frod_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every dW_i into its base weight and put the original modules back: a plain model again.
    A 4-bit layer cannot hold W + dW, so it comes back as an nn.Linear holding dequant(W_q) + dW_i in its compute
    dtype (the function the adapted layer computed); 4-bit layers the adapter did not touch stay as they are."""
    for name, layer in list(frod_layers(model)):
        if layer.quantized:
            _set_module(model, name, _plain_linear(layer.base_layer, layer.effective_weight()))
            continue
        if not layer.merged:
            with torch.no_grad():
                W = weight_of(layer.base_layer)
                W.add_(layer.delta_weight().to(W.dtype))
        _set_module(model, name, layer.base_layer)
    if _state(model) is not None:
        delattr(model, STATE_ATTR)
    return model



def _plain_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear computing x weight^T + the bias of `base` (a 4-bit layer being merged), in weight's dtype."""
    with torch.device("meta"):
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None)
    plain.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if base.bias is not None:
        plain.bias = nn.Parameter(base.bias.detach().to(weight.dtype), requires_grad=base.bias.requires_grad)
    return plain


def merge_into(model: nn.Module, base_model: nn.Module) -> nn.Module:
    """Fold `model`'s trained dW_i, as built on its own base (for a 4-bit base: from dequant(W_q)), into the same
    layers of `base_model`, typically the unquantized original of that base, and copy the trained
    modules_to_save; returns base_model, a plain model. Its outputs differ from `model`'s by what the two bases
    differ by (the quantization error), not by the update."""
    state = _state(model)
    if state is None:
        raise FrodError("this model carries no FRoD adapter")
    modules = dict(base_model.named_modules())
    for name, layer in frod_layers(model):
        target = modules.get(name)
        if target is None or not is_linear(target) or is_4bit(target) or isinstance(target, FrodLinear):
            raise FrodError(f"the other base has no plain linear layer {name!r} to merge into")
        if weight_shape(target) != (layer.out_features, layer.in_features):
            raise FrodError(f"the other base's {name} is {weight_shape(target)}, the adapter's "
                            f"{(layer.out_features, layer.in_features)}")
        with torch.no_grad():
            W = weight_of(target)
            W.add_(layer.delta_weight().to(W.device, W.dtype))
    if state.config.modules_to_save:
        with torch.no_grad():
            for name, module in model.named_modules():
                saved = matches(name, state.config.modules_to_save) and not isinstance(module, FrodLinear)
                if saved and name in modules:
                    modules[name].load_state_dict(module.state_dict())
    return base_model

def summary(model: nn.Module) -> dict:
    state = _state(model)
    if state is None:
        raise FrodError("this model carries no FRoD adapter")
    layers = dict(frod_layers(model))
    cats = []
    for cat in state.categories:
        members = [(n, l) for n, l in layers.items() if l.category is cat]
        cats.append({
            "key": cat.key, "n": cat.n, "layers": len(members), "k": cat.k,
            "trainable": sum(l.frod_lambda.numel() + l.frod_s.numel() for _, l in members),
            "inert_directions": sum(int((l.frod_sigma == 0).sum()) for _, l in members),
            "U": "stored" if any(l.frod_U_t is not None for _, l in members) else "recomputed",
        })
    own = {id(p) for l in layers.values() for p in (l.frod_lambda, l.frod_s)}
    base_params = sum(p.numel() for p in model.parameters() if id(p) not in own)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "categories": cats, "layers": len(layers), "frod_trainable": sum(c["trainable"] for c in cats),
        "trainable": trainable, "base_params": base_params,
        "percent": 100.0 * trainable / max(1, base_params),
    }


# ---- save / load ----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path) -> Path:
    """adapter.safetensors (basis, pattern, initial scaling, trained values, saved modules) +
    adapter_config.json (config, layout, base-weight fingerprint). Written to a temp dir, then renamed."""
    from safetensors.torch import save_file

    state = _state(model)
    if state is None:
        raise FrodError("this model carries no FRoD adapter to save")
    path = Path(path)
    layers = dict(frod_layers(model))
    tensors, cat_meta, layer_meta = {}, [], {}
    for i, cat in enumerate(state.categories):
        tensors[f"category.{i}.V"] = cat.V
        if cat.V_inv_T is not None:
            tensors[f"category.{i}.V_inv_T"] = cat.V_inv_T
        tensors[f"category.{i}.rows"] = cat.rows
        tensors[f"category.{i}.cols"] = cat.cols
        members = [n for n, l in layers.items() if l.category is cat]
        cat_meta.append({"key": cat.key, "n": cat.n, "k": cat.k, "layers": members})
        for name in members:
            layer = layers[name]
            tensors[f"layer.{name}.sigma"] = layer.frod_sigma
            tensors[f"layer.{name}.lambda"] = layer.frod_lambda
            tensors[f"layer.{name}.s"] = layer.frod_s
            if layer.frod_U_t is not None and cat.V_inv_T is None:  # not recomputable: the file must carry it
                tensors[f"layer.{name}.U_t"] = layer.frod_U_t
            layer_meta[name] = {"category": i, "in": layer.in_features, "out": layer.out_features,
                                "kind": "Conv1D" if is_conv1d(layer.base_layer) else "Linear"}
    saved_modules = []
    if state.config.modules_to_save:
        for name, module in model.named_modules():
            if matches(name, state.config.modules_to_save) and not isinstance(module, FrodLinear):
                saved_modules.append(name)
                for pname, p in module.state_dict().items():
                    tensors[f"module.{name}.{pname}"] = p
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": state.config.to_dict(),
        "fingerprint": state.fingerprint, "categories": cat_meta, "layers": layer_meta,
        "modules_to_save": saved_modules, "base_quantization": base_quantization(layers.values()),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": ADAPTER_FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    atomic_dir(str(path), lambda tmp: write(Path(tmp)))
    return path


def read_adapter(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Read and validate an adapter directory (JSON + safetensors only; no pickles)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        raise FrodError(f"{path} is not a FRoD adapter (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FrodError(f"{cfg_file} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise FrodError(f"{cfg_file} is not a FRoD adapter config")
    if meta.get("version") != ADAPTER_VERSION:
        raise FrodError(f"{cfg_file} has adapter format version {meta.get('version')}; this frod reads {ADAPTER_VERSION}")
    try:
        # Fresh, allocator-aligned copies: BLAS kernels may round differently on unaligned buffers, and
        # a reloaded adapter must reproduce the saved model's outputs bit for bit.
        tensors = {k: v.clone() for k, v in load_file(str(w_file)).items()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise FrodError(f"{w_file} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return meta, tensors


def load_adapter(model: nn.Module, path, strict: bool = True, allow_other_base: bool = False) -> nn.Module:
    """Rebuild a saved adapter on `model` (the same base model it was built on) exactly: the basis,
    pattern and values come from the file, nothing is recomputed. Another base model is refused, and so is
    the same one quantized differently (4-bit or not: U_i is recomputed from W_i, so dW_i would change) unless
    allow_other_base=True (strict=False skips the weight fingerprint only)."""
    if _state(model) is not None:
        raise FrodError("this model already carries a FRoD adapter")
    meta, tensors = read_adapter(path)
    try:
        config = FrodConfig.from_dict(meta["config"])
        modules = dict(model.named_modules())
        members: Dict[str, List[Tuple[str, nn.Module]]] = {}
        for name, info in meta["layers"].items():
            module = modules.get(name)
            if module is None or not is_linear(module):
                raise FrodError(f"adapter at {path} does not fit this model: no linear layer {name!r}")
            shape = weight_shape(module)
            if shape != (info["out"], info["in"]):
                raise FrodError(f"adapter at {path} does not fit this model: {name} is {shape[0]}x{shape[1]}, "
                                f"the adapter expects {info['out']}x{info['in']}")
        targets = [(n, modules[n]) for n in meta["layers"]]
        if not allow_other_base:
            _check_base(meta, targets, path, strict)
        device = targets[0][1].weight.device
        categories, per_layer = [], {}
        for i, cm in enumerate(meta["categories"]):
            t = lambda k: tensors[f"category.{i}.{k}"].to(device)  # noqa: E731
            V_inv_T = t("V_inv_T") if f"category.{i}.V_inv_T" in tensors else None
            cat = FrodCategory(cm["key"], t("V"), V_inv_T, t("rows"), t("cols"))
            categories.append(cat)
            members[cm["key"]] = [(n, modules[n]) for n in cm["layers"]]
            for name in cm["layers"]:
                g = lambda k: tensors[f"layer.{name}.{k}"].to(device)  # noqa: E731
                data = {"sigma": g("sigma"), "lambda": g("lambda"), "s": g("s")}
                if f"layer.{name}.U_t" in tensors:
                    data["U_t"] = g("U_t")
                elif V_inv_T is None:
                    raise FrodError(f"adapter at {path} is incomplete: {name} needs U but the file has none")
                if data["s"].numel() != cat.k or data["sigma"].numel() != cat.n:
                    raise FrodError(f"adapter at {path} is inconsistent: sizes of {name} do not match its category")
                per_layer[name] = data
    except KeyError as e:
        raise FrodError(f"adapter at {path} is incomplete: missing {e}") from None
    _install(model, config, categories, members, per_layer, meta["fingerprint"])
    with torch.no_grad():
        for name in meta.get("modules_to_save", []):
            module = model.get_submodule(name)
            sd = {k[len(f"module.{name}."):]: v for k, v in tensors.items() if k.startswith(f"module.{name}.")}
            missing, unexpected = module.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise FrodError(f"adapter at {path}: saved module {name} does not fit ({missing or unexpected})")
    if config.store_u:
        for _, layer in frod_layers(model):
            if layer.frod_U_t is None:
                layer.frod_U_t = layer.U_t().detach().contiguous()
    return model
