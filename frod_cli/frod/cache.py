"""The basis cache: the decomposition of one category (V, V^-T, sigma, and U where it must be stored) kept
on disk, so that a second run on the same base (a sweep's next job, `frod compare`'s other methods and
seeds, a resumed or repeated run) skips the HO-GSVD.

Keyed by content: a sha256 over every element of the category's weights (as stored: a base that differs in
one weight misses), the layer names and shapes, and what changes the result (regularization, basis dtype,
the build: a streamed decomposition's entry keys apart from the in-memory one's, whose factors differ from it
by rounding; the version of the decomposition's code). The weights are hashed as the build reads them, one
row block of one layer at a time (source_key). Not in the key: the device and thread count the entry was
computed with (the factors agree to rounding; the entry records where it was computed). Callers give a
directory and know nothing else of it.

One entry = `<directory>/<key>.safetensors` (safetensors only), written to a temporary sibling and renamed
into place. Its metadata describes it (base, category, layers, settings, where and how long it was
computed) and holds a sha256 of its tensor bytes, checked on every read: a truncated, corrupt or
mismatched entry is recomputed with a warning, never trusted and never a crash. A cache that cannot be
written (read-only, full disk) is a warning too: the run goes on without it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .atomic import atomic_file
from .basis import CategoryBasis, block_rows
from .sources import TensorSource

FORMAT = "frod-basis"
LAYOUT_VERSION = 1  # of the entry file
# Bump when a change to basis.shared_basis alters its results, so that entries of the old code miss.
ALGORITHM_VERSION = 1
SUFFIX = ".safetensors"
# Only files named like entries (or their temporary siblings) are listed or removed: FROD_CACHE_DIR may
# point at a directory that holds other files.
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\.safetensors\.tmp-.*")


def blocks_digest(blocks: Iterable[torch.Tensor]) -> bytes:
    """sha256 of a layer's bytes as stored (its dtype's bytes, row-major), given as its row blocks in order (the
    same digest as the whole layer's), read on the CPU."""
    h = hashlib.sha256()
    for block in blocks:
        t = block.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # hashlib releases the GIL
    return h.digest()


def layer_digest(W: torch.Tensor) -> bytes:
    """sha256 of every element of W as stored (its dtype's bytes, row-major), read on the CPU."""
    return blocks_digest([W])


def source_key(category: str, source, regularization: float, basis_dtype: str, streamed: bool = False) -> str:
    """The cache key of a category from a layer source (sources.py): each layer hashed as the source reads it, one
    row block at a time (layers in parallel threads, one per core torch uses; in order for a collective source,
    whose reads every rank makes together), with its name, shape and dtype, and the settings that change the
    decomposition. The streamed build's factors differ from the in-memory one's by rounding, so it keys apart
    (`streamed`); the in-memory key is the one entries had before the streamed build existed."""
    rows = block_rows(source.shapes[0][1])
    digest = lambda i: blocks_digest(source.blocks(i, rows))  # noqa: E731
    if source.collective:
        digests = [digest(i) for i in range(len(source.shapes))]
    else:
        threads = max(1, min(len(source.shapes), torch.get_num_threads()))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            digests = list(pool.map(digest, range(len(source.shapes))))
    h = hashlib.sha256(f"{FORMAT}:{LAYOUT_VERSION}:{ALGORITHM_VERSION}".encode())
    h.update(json.dumps([category, float(regularization).hex(), basis_dtype, *(["streamed"] if streamed else [])])
             .encode())
    for name, shape, dtype, d in zip(source.names, source.shapes, source.dtypes, digests):
        h.update(json.dumps([name, [int(x) for x in shape], str(dtype)]).encode())
        h.update(d)
    return h.hexdigest()


def entry_key(category: str, names: Sequence[str], weights: Sequence[torch.Tensor], regularization: float,
              basis_dtype: str, streamed: bool = False) -> str:
    """The cache key of a category whose weights are in memory (see source_key)."""
    return source_key(category, TensorSource(weights, names), regularization, basis_dtype, streamed)


def _tensors(basis: CategoryBasis) -> Dict[str, torch.Tensor]:
    t = {"V": basis.V, "sigma": torch.stack(list(basis.sigma))}  # sigma: N x n, in layer order
    if basis.V_inv_T is not None:
        t["V_inv_T"] = basis.V_inv_T
    if basis.U is not None:
        t["U"] = torch.cat(list(basis.U), dim=0)  # the U_i stacked like the W_i: M x n
    return {k: v.detach().cpu().contiguous() for k, v in t.items()}


def _checksum(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, list(t.shape), str(t.dtype)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class BasisCache:
    """The entries of one directory (created on the first write)."""

    def __init__(self, directory):
        self.directory = Path(os.path.expanduser(str(directory)))
        self.write_failed = False

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def load(self, key: str, shapes: Sequence[Tuple[int, int]], dtype: torch.dtype) -> Optional[CategoryBasis]:
        """The entry's basis on the CPU, or None: absent, or unusable (with a warning saying why)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            meta, tensors = _read(path)
            problem = _mismatch(meta, tensors, key, shapes, dtype)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, it is not trusted
            problem = f"is unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        if problem:
            warnings.warn(f"FRoD basis cache: {path} {problem}; recomputing it", stacklevel=2)
            return None
        rows = [int(m) for m, _ in shapes]
        sigma = [s.clone() for s in tensors["sigma"].unbind(0)]
        U = None
        if "U" in tensors:
            U = [u.clone() for u in torch.split(tensors["U"], rows, dim=0)]
        return CategoryBasis(V=tensors["V"], V_inv_T=tensors.get("V_inv_T"), sigma=sigma, U=U,
                             rank_deficient=meta["rank_deficient"] == "true")

    def store(self, key: str, basis: CategoryBasis, info: Dict[str, object]) -> bool:
        """Write the entry atomically; False (and one warning per cache) when the directory refuses it."""
        from safetensors.torch import save_file

        tensors = _tensors(basis)
        meta = {"format": FORMAT, "layout_version": str(LAYOUT_VERSION), "key": key,
                "rank_deficient": "true" if basis.rank_deficient else "false", "checksum": _checksum(tensors),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "info": json.dumps(info)}
        try:
            atomic_file(str(self.path(key)), lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:
            if not self.write_failed:
                warnings.warn(f"FRoD basis cache: cannot write to {self.directory} ({e.strerror or e}); "
                              "continuing without caching", stacklevel=2)
            self.write_failed = True
            return False
        return True


def _read(path: Path) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        # fresh, allocator-aligned copies (as read_adapter does): the factors must be bitwise what was stored
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    return meta, tensors


def _mismatch(meta: Dict[str, str], tensors: Dict[str, torch.Tensor], key: str,
              shapes: Sequence[Tuple[int, int]], dtype: torch.dtype) -> Optional[str]:
    """Why the entry cannot stand for the category (None: it can)."""
    if meta.get("format") != FORMAT or meta.get("layout_version") != str(LAYOUT_VERSION):
        return f"is not a FRoD basis entry of layout {LAYOUT_VERSION}"
    if meta.get("key") != key:
        return "holds another category's basis (its key differs from its name)"
    if meta.get("checksum") != _checksum(tensors):
        return "is corrupt (its tensors do not match their checksum)"
    n, N, M = int(shapes[0][1]), len(shapes), sum(int(m) for m, _ in shapes)
    deficient = meta.get("rank_deficient") == "true"
    expected = {"V": (n, n), "sigma": (N, n)}
    expected.update({"U": (M, n)} if deficient else {"V_inv_T": (n, n)})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        return f"does not fit the category (tensors {got}, expected {expected})"
    if any(t.dtype != dtype for t in tensors.values()):
        return f"holds {tensors['V'].dtype} factors, not {dtype}"
    return None


# ---- what the cache holds (`frod cache list` / `frod cache clear`) ---------------------------------------
def list_entries(directory) -> List[Dict[str, object]]:
    """One dict per entry file, newest first: file, bytes, and what its metadata says (base, category,
    layers, settings, created, where computed); `problem` for a file whose header cannot be read."""
    from safetensors import safe_open

    root = Path(os.path.expanduser(str(directory)))
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(p for p in root.iterdir() if ENTRY_NAME.fullmatch(p.name) and p.is_file()):
        entry: Dict[str, object] = {"file": str(path), "bytes": path.stat().st_size}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            entry.update(json.loads(meta.get("info", "{}")))
            entry.update({k: meta.get(k) for k in ("key", "created", "torch", "rank_deficient")})
        except Exception as e:  # noqa: BLE001 - listed as damaged; a run would recompute it
            entry["problem"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        entries.append(entry)
    entries.sort(key=lambda e: str(e.get("created") or ""), reverse=True)
    return entries


def clear_cache(directory, base: Optional[str] = None) -> Tuple[int, int]:
    """Remove every entry (or those whose base is `base`) and any temporary file left by a killed write;
    (files removed, bytes freed)."""
    root = Path(os.path.expanduser(str(directory)))
    if not root.is_dir():
        return 0, 0
    removed = freed = 0
    if base is None:
        victims = [p for p in root.iterdir()
                   if p.is_file() and (ENTRY_NAME.fullmatch(p.name) or TEMP_NAME.fullmatch(p.name))]
    else:
        victims = [Path(str(e["file"])) for e in list_entries(root) if e.get("base") == base]
    for path in victims:
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        removed, freed = removed + 1, freed + size
    return removed, freed
