"""Building the shared bases of all categories for `apply_frod`: on the run's device, in memory or streamed,
split over the ranks of a distributed launch, and through the basis cache (cache.py).

- Layers: each category's W_i come from a layer source (sources.py): the model's modules by default, or a
  checkpoint's safetensors files read lazily (`apply_frod(..., weights_from=)`).
- Build: `memory` decomposes the stacked category at once (basis.shared_basis: the fast path, about 5 M n
  elements of workspace); `streamed` one layer block at a time (basis.streamed_basis: a few n x n matrices,
  whatever the number of layers); `auto` takes `memory` where its workspace fits the free memory of the device,
  else `streamed` (choose_build). The report and the log say which ran.
- Device: each category is decomposed on `device` (the accelerator the run trains on) and the factors moved back
  to where the category's weights live; one category at a time (the peak is logged on a GPU). A category that
  fits the device in neither way is decomposed on the CPU, with a warning.
- Ranks: when torch.distributed is initialized with more than one process, `apply_frod` is a collective.
  The categories are dealt to the ranks by their cost (basis.decomposition_cost), largest first, each to
  the least loaded rank; each rank builds its share; every category is then broadcast from its owner, so
  every rank holds the owner's bytes (bit-identical tensors). A category is computed exactly as one
  process computes it (the same code on the same weights), so the split equals a one-process build at
  the same thread count. A collective source (sharded weights, gathered one layer at a time) is read by every
  rank in the same order: every rank then builds every category (the same bytes, no broadcast).
- Cache: the owner of a category hashes its weights (streaming them, one layer at a time), loads the entry or
  computes and stores it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .basis import CategoryBasis, decomposition_cost, shared_basis, streamed_basis
from .cache import BasisCache, source_key
from .config import BASIS_BUILDS, FrodError
from .sources import ModuleSource, WeightSource

log = logging.getLogger("frod.basis")

Members = List[Tuple[str, nn.Module]]


def assign_ranks(costs: Dict[str, float], world: int, holders: Optional[Sequence[int]] = None) -> Dict[str, int]:
    """Greedy longest-processing-time split: categories by decreasing cost (ties by key), each to the rank
    with the least cost so far (ties to the lowest rank). Deterministic, so every rank computes the same plan.
    holders: the ranks that hold the weights (default all; train.fsdp.load_on_rank0 starts the others on meta)."""
    ranks = list(range(world)) if holders is None else list(holders)
    load = {r: 0.0 for r in ranks}
    owner = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(ranks, key=lambda i: (load[i], i))
        owner[key] = r
        load[r] += costs[key]
    return owner


def world_and_rank() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def build_bases(groups: Dict[str, Members], regularization: float, basis_dtype: str, fingerprint: str, *,
                device: Optional[torch.device] = None, cache: Optional[BasisCache] = None,
                describe: Optional[Dict[str, str]] = None, build: str = "auto",
                sources: Optional[Dict[str, WeightSource]] = None,
                holders: Optional[Sequence[int]] = None) -> Tuple[Dict[str, CategoryBasis], List[dict]]:
    """The basis of every category (on its weights' device) and one report per category: source
    ("computed" or "cache"), build ("memory" or "streamed"), rank that built it, seconds, hashing seconds, device
    peak bytes. `fingerprint` identifies the base weights (adapter.fingerprint_weights; the ranks compare it);
    `describe` goes into new cache entries (base name and fingerprint, for `frod cache list`); `sources` reads a
    category's layers from elsewhere than its modules (sources.checkpoint_sources); `holders`: the ranks holding
    the weights, which build (None: all), the others receive (their bases on the CPU: train.fsdp.load_on_rank0)."""
    if build not in BASIS_BUILDS:
        raise FrodError(f"basis_build must be one of {', '.join(BASIS_BUILDS)}, got {build!r}")
    world, rank = world_and_rank()
    sources = {key: (sources or {}).get(key) or ModuleSource(members) for key, members in groups.items()}
    shapes = {key: list(source.shapes) for key, source in sources.items()}
    collective = world > 1 and any(source.collective for source in sources.values())
    owner = {k: rank for k in groups} if collective else \
        assign_ranks({k: decomposition_cost(s) for k, s in shapes.items()}, world, holders)
    if world > 1:
        check_same_plan(groups, shapes, regularization, basis_dtype, fingerprint)
    dtype = getattr(torch, basis_dtype)
    bases: Dict[str, CategoryBasis] = {}
    reports: Dict[str, dict] = {}
    try:
        for key in groups:
            if owner[key] == rank:
                bases[key], reports[key] = build_category(key, sources[key], regularization, dtype, device=device,
                                                          cache=cache, describe=describe, build=build)
    except Exception as e:  # noqa: BLE001 - re-raised here, after telling the other ranks (no hang)
        if world > 1:
            agree_on_failure(device, 1 if isinstance(e, FrodError) else 2)
        raise
    if world > 1:
        agree_on_failure(device, 0)
        if not collective:
            share(bases, reports, groups, shapes, owner, dtype, device)
    return bases, [reports[k] for k in groups]


def agree_on_failure(device: Optional[torch.device], mine: int) -> None:
    """Every rank says whether its share failed (0 no, 1 a refusal, 2 an error); a rank whose share went
    well raises too when another's failed, instead of waiting for its broadcast until the timeout."""
    import torch.distributed as dist

    flag = torch.tensor([mine], dtype=torch.int64, device=comm_device(device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    worst = int(flag.item())
    if mine == 0 and worst == 1:
        raise FrodError("another process refused to build its share of the FRoD bases (its error is in its log)")
    if mine == 0 and worst == 2:
        raise RuntimeError("another process failed while building its share of the FRoD bases (see its log)")


# What a report counts besides its source; the other ranks learn them from the owner (share).
# seconds / cpu_s: wall and process CPU seconds of the decomposition; cache_cpu_s: process CPU seconds of hashing,
# reading and (on a miss) writing the entry, which on a loaded machine compare better than wall times.
MEASURES = ("seconds", "cpu_s", "hash_s", "load_s", "store_s", "cache_cpu_s", "device_peak_bytes")


def build_category(key: str, source: WeightSource, regularization: float, dtype: torch.dtype, *,
                   device: Optional[torch.device], cache: Optional[BasisCache],
                   describe: Optional[Dict[str, str]] = None, build: str = "auto") -> Tuple[CategoryBasis, dict]:
    """One category: from the cache, or decomposed on `device` in memory or streamed (and stored); factors on the
    source's device. The report's seconds: decomposition; hash_s: the cache key; load_s / store_s: reading /
    writing the entry."""
    shapes = list(source.shapes)
    mode, where = choose_build(build, shapes, dtype, torch.device(device) if device is not None else source.device)
    mode = "memory" if collective_min(mode == "memory", source, where) else "streamed"
    report = {"category": key, "layers": len(shapes), "n": int(shapes[0][1]), "rank": world_and_rank()[1],
              "source": "computed", "build": mode, **{m: 0.0 for m in MEASURES}}
    basis, entry = None, None
    if cache is not None:
        c0, t0 = time.process_time(), time.perf_counter()
        entry = source_key(key, source, regularization, str(dtype).replace("torch.", ""), streamed=mode == "streamed")
        t1 = time.perf_counter()
        basis = cache.load(entry, shapes, dtype)
        basis = basis if collective_min(basis is not None, source, where) else None
        report.update(hash_s=t1 - t0, load_s=time.perf_counter() - t1, cache_cpu_s=time.process_time() - c0,
                      source="computed" if basis is None else "cache")
    if basis is None:
        c0 = time.process_time()
        basis, report["seconds"], report["device_peak_bytes"] = decompose(source, regularization, dtype, where, mode)
        report["cpu_s"] = time.process_time() - c0
        if cache is not None and (not source.collective or world_and_rank()[1] == 0):
            info = {**(describe or {}), "category": key, "layers": list(source.names),
                    "shapes": [list(s) for s in shapes], "regularization": regularization,
                    "basis_dtype": str(dtype).replace("torch.", ""), "build": mode, "computed_on": str(where),
                    "compute_s": round(report["seconds"], 3)}
            c0, t0 = time.process_time(), time.perf_counter()
            cache.store(entry, basis, info)
            report["store_s"] = time.perf_counter() - t0
            report["cache_cpu_s"] += time.process_time() - c0
    log.debug("FRoD basis %s: %d layers, %s (%s) in %.2f s (hash %.2f s)", key, len(shapes), report["source"],
              mode, report["seconds"], report["hash_s"])
    return to_device(basis, source.device), report


def collective_min(flag: bool, source: WeightSource, device: torch.device) -> bool:
    """For a collective source, which every rank reads in the same order: whether `flag` holds on every rank (a
    rank alone taking another branch, a cache hit or the in-memory build, would wait in a gather the others
    never join). Other sources: `flag` as it is."""
    world, _ = world_and_rank()
    if not source.collective or world == 1:
        return flag
    import torch.distributed as dist

    mine = torch.tensor([int(bool(flag))], dtype=torch.int64, device=comm_device(device))
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    return bool(int(mine.item()))


def workspace_bytes(shapes: Sequence[Tuple[int, int]], dtype: torch.dtype) -> int:
    """About what shared_basis holds at once for a stack of M rows: the W_i copied to the device, the stack A,
    Q and the first round's Q, B = Q Z (5 M n elements), the tall layers' n x n Gram blocks, and a few n x n
    factors. (Measured on the CPU, where the W_i are not copied: about 4 M n.)"""
    n, M = int(shapes[0][1]), sum(int(m) for m, _ in shapes)
    tall = sum(1 for m, _ in shapes if int(m) >= n)
    return (5 * M * n + tall * n * n + 8 * n * n) * torch.empty(0, dtype=dtype).element_size()


def streamed_workspace_bytes(shapes: Sequence[Tuple[int, int]], dtype: torch.dtype) -> int:
    """About what streamed_basis holds at once: the n x n matrices (R, Z, V, V^-T, a layer's Gram block, its
    Cholesky factor and inverse: 7 in the basis dtype; the float64 accumulator of G or T: 2 more in float32
    terms), two row blocks of at most n rows (W and Q), one source layer materialized (a 4-bit layer
    dequantized, a sharded one gathered: counted in float32), and sigma. Independent of the number of layers
    but for sigma (N n). A wide stack (M < n) is held whole, below n x n."""
    n, N = int(shapes[0][1]), len(shapes)
    if sum(int(m) for m, _ in shapes) < n:
        return workspace_bytes(shapes, dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    largest = max(int(m) for m, _ in shapes)
    return (11 * n * n + N * n) * size + 4 * largest * n


def device_free_bytes(device: torch.device) -> Optional[int]:
    """Free memory of `device` for one decomposition: on a GPU what the driver has free plus what torch's caching
    allocator holds unused; on the CPU the kernel's MemAvailable, shared by the processes of this node
    (LOCAL_WORLD_SIZE, set by torchrun, build at the same time). None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def fits_on(device: torch.device, need: int, free_bytes=None) -> bool:
    """Whether `need` bytes fit the free memory of `device` (free_bytes, default measured now), with a tenth to
    spare on a GPU and a fifth on the CPU (the loaded model and the other processes live there too); a device
    whose free memory is unknown is assumed to fit."""
    free = device_free_bytes(device) if free_bytes is None else free_bytes
    if free is None:
        return True
    return need <= (0.9 if device.type == "cuda" else 0.8) * free


def choose_build(build: str, shapes: Sequence[Tuple[int, int]], dtype: torch.dtype,
                 device: torch.device) -> Tuple[str, torch.device]:
    """(how, where) a category is decomposed. `memory` and `streamed` as asked, on `device` or, where that cannot
    hold the workspace, on the CPU with a warning. `auto`: in memory where that fits (the fast path), else
    streamed; the device before the CPU."""
    need = {"memory": workspace_bytes(shapes, dtype), "streamed": streamed_workspace_bytes(shapes, dtype)}
    cpu = torch.device("cpu")
    tries = [(mode, where) for where in dict.fromkeys([device, cpu])
             for mode in (("memory", "streamed") if build == "auto" else (build,))]
    mode, where = next(((m, w) for m, w in tries if fits_on(w, need[m])), tries[-1])
    if where != device:
        asked = " or ".join(f"{need[m] / 2**30:.1f} GiB {m}" for m, w in tries if w == device)
        warnings.warn(f"FRoD basis: a category of {len(shapes)} layers of {shapes[0][0]} x {shapes[0][1]} needs "
                      f"about {asked} to decompose, more than {device} has free: decomposing it {mode} on the CPU",
                      stacklevel=4)
    return mode, where


def decompose(source: WeightSource, regularization: float, dtype: torch.dtype, device: torch.device,
              mode: str) -> Tuple[CategoryBasis, float, int]:
    """The decomposition on `device`, in memory or streamed: (basis there, seconds, peak device bytes above what
    was allocated before)."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if mode == "streamed":
        basis = streamed_basis(source, regularization, dtype, device=device)
    else:
        basis = shared_basis([source.layer(i) for i in range(len(source))], regularization, dtype, device=device)
    peak = 0
    if on_cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return basis, time.perf_counter() - t0, int(peak)


def to_device(basis: CategoryBasis, device: torch.device) -> CategoryBasis:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return CategoryBasis(V=move(basis.V), V_inv_T=move(basis.V_inv_T), sigma=[move(s) for s in basis.sigma],
                         U=None if basis.U is None else [move(u) for u in basis.U], rank_deficient=basis.rank_deficient)


# ---- the collective part ------------------------------------------------------------------------------
def comm_device(device: Optional[torch.device]) -> torch.device:
    """Where a tensor must be for the process group's backend: gloo takes CPU tensors, nccl CUDA ones."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "nccl" not in backend:
        return torch.device("cpu")
    if device is not None and torch.device(device).type == "cuda":
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device())


def check_same_plan(groups: Dict[str, Members], shapes: Dict[str, list], regularization: float,
                    basis_dtype: str, fingerprint: str) -> None:
    """Every rank must adapt the same categories of the same base weights (`fingerprint`) with the same
    settings: a rank whose weights differed would silently get the owner's basis, and different layers
    would pair different tensors in the broadcasts. Compares a digest of the plan over the ranks (a
    refusal on every rank, no hang)."""
    import torch.distributed as dist

    plan = [[k, [n for n, _ in groups[k]], shapes[k]] for k in groups]
    plan += [float(regularization).hex(), basis_dtype, fingerprint]
    digest = hashlib.sha256(repr(plan).encode()).digest()
    words = torch.tensor([int.from_bytes(digest[i:i + 7], "little") for i in range(0, 28, 7)], dtype=torch.int64)
    both = torch.cat([words, -words]).to(comm_device(None))
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[:4].cpu(), -both[4:].cpu()):
        raise FrodError("the processes adapt different models (their FRoD categories, layers, base weights or "
                        "settings differ): in a distributed launch every rank must call apply_frod with the same "
                        "model and config")


def share(bases: Dict[str, CategoryBasis], reports: Dict[str, dict], groups: Dict[str, Members],
          shapes: Dict[str, list], owner: Dict[str, int], dtype: torch.dtype, device: Optional[torch.device]) -> None:
    """Broadcast every category from its owner (one flat buffer per category); fills `bases` and `reports`
    with the other ranks' categories, placed on their weights' device."""
    import torch.distributed as dist

    rank = dist.get_rank()
    comm = comm_device(device)
    keys = list(groups)
    # per category, from its owner: rank deficient, from the cache, streamed, then the MEASURES of its report
    facts = torch.zeros(len(keys), 3 + len(MEASURES), dtype=torch.float64)
    for i, key in enumerate(keys):
        if owner[key] == rank:
            r = reports[key]
            facts[i] = torch.tensor([float(bases[key].rank_deficient), float(r["source"] == "cache"),
                                     float(r["build"] == "streamed"), *(float(r[m]) for m in MEASURES)],
                                    dtype=torch.float64)
    facts = facts.to(comm)
    dist.all_reduce(facts)
    facts = facts.cpu()
    for i, key in enumerate(keys):
        deficient = bool(facts[i, 0])
        flat = pack(bases[key], comm) if owner[key] == rank else \
            torch.empty(packed_numel(shapes[key], deficient), dtype=dtype, device=comm)
        dist.broadcast(flat, src=owner[key])
        if owner[key] != rank:
            home = groups[key][0][1].weight.device  # (weight_of would dequantize a 4-bit layer)
            home = torch.device("cpu") if home.type == "meta" else home  # a rank that holds no weights
            bases[key] = unpack(flat, shapes[key], deficient, home)
            reports[key] = {"category": key, "layers": len(groups[key]), "n": int(shapes[key][0][1]),
                            "rank": owner[key], "source": "cache" if facts[i, 1] else "computed",
                            "build": "streamed" if facts[i, 2] else "memory",
                            **{m: float(v) for m, v in zip(MEASURES, facts[i, 3:].tolist())}}
        del flat


def packed_numel(shapes: Sequence[Tuple[int, int]], deficient: bool) -> int:
    n, N, M = int(shapes[0][1]), len(shapes), sum(int(m) for m, _ in shapes)
    return n * n + N * n + (M * n if deficient else n * n)


def pack(basis: CategoryBasis, device: torch.device) -> torch.Tensor:
    """V, sigma_1..N, then V^-T or (rank deficient) U_1..N, flattened into one buffer."""
    parts = [basis.V, *basis.sigma, *(basis.U if basis.rank_deficient else [basis.V_inv_T])]
    return torch.cat([p.reshape(-1).to(device) for p in parts])


def unpack(flat: torch.Tensor, shapes: Sequence[Tuple[int, int]], deficient: bool, home: torch.device) -> CategoryBasis:
    """The inverse of `pack`; every tensor a fresh copy on `home` (allocator-aligned, like a computed one)."""
    n = int(shapes[0][1])
    sizes = [n * n] + [n] * len(shapes) + ([int(m) * n for m, _ in shapes] if deficient else [n * n])
    pieces = [p.to(home, copy=True) for p in torch.split(flat, sizes)]
    V, sigma, rest = pieces[0].view(n, n), pieces[1:1 + len(shapes)], pieces[1 + len(shapes):]
    if deficient:
        U = [u.view(int(m), n) for u, (m, _) in zip(rest, shapes)]
        return CategoryBasis(V=V, V_inv_T=None, sigma=sigma, U=U, rank_deficient=True)
    return CategoryBasis(V=V, V_inv_T=rest[0].view(n, n), sigma=sigma, U=None, rank_deficient=False)
