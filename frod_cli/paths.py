"""frod's directories, resolved in one place from one family of environment variables:

    FROD_CACHE         what frod keeps between runs (default: $XDG_CACHE_HOME/frod, else ~/.cache/frod):
                         $FROD_CACHE/<asset>   offline assets `make assets` prepares (smollm2-135m, vit-fmnist),
                                               loaded as model.name_or_path=offline:<asset>
                         $FROD_CACHE/basis     the FRoD basis cache (frod_cli/frod/cache.py, `frod cache`)
    FROD_BASIS_CACHE   the basis cache alone, somewhere else (FROD_CACHE_DIR, its earlier name, is still read)
    FROD_OUTPUT        where `frod train` and `frod compare` put runs when no directory is named: $FROD_OUTPUT/runs/
                       and $FROD_OUTPUT/multirun/ (default: the working directory)

The recipes reach the output root through the OmegaConf resolver `${frod_dir:runs}` / `${frod_dir:multirun}`
(registered with the schemas), scripts/prepare_smollm2.py and scripts/pretrain_vit.py through `asset_dir`.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE = "FROD_CACHE"
BASIS_CACHE = "FROD_BASIS_CACHE"
LEGACY_BASIS_CACHE = "FROD_CACHE_DIR"
OUTPUT = "FROD_OUTPUT"


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def cache_root() -> Path:
    """$FROD_CACHE, else $XDG_CACHE_HOME/frod, else ~/.cache/frod."""
    if _env(CACHE):
        return Path(_env(CACHE)).expanduser().absolute()
    base = Path(_env("XDG_CACHE_HOME")).expanduser() if _env("XDG_CACHE_HOME") else Path.home() / ".cache"
    return (base / "frod").absolute()


def asset_dir(name: str) -> Path:
    """Where the offline asset `name` is prepared and read: $FROD_CACHE/<name>."""
    return cache_root() / name


def basis_cache_dir() -> str:
    """The FRoD basis cache: $FROD_BASIS_CACHE, else $FROD_CACHE_DIR, else $FROD_CACHE/basis."""
    for name in (BASIS_CACHE, LEGACY_BASIS_CACHE):
        if _env(name):
            return str(Path(_env(name)).expanduser().absolute())
    return str(cache_root() / "basis")


def output_dir(kind: str) -> str:
    """The root of `kind` (runs | multirun) when the command names no directory: $FROD_OUTPUT/<kind>, else <kind>
    in the working directory (as Hydra resolves a relative run dir)."""
    if kind not in ("runs", "multirun"):
        raise ValueError(f"unknown output kind {kind!r}: runs or multirun")
    return str(Path(_env(OUTPUT)).expanduser() / kind) if _env(OUTPUT) else kind


def register_resolver() -> None:
    """`${frod_dir:runs}` / `${frod_dir:multirun}` in the recipes (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("frod_dir"):
        OmegaConf.register_new_resolver("frod_dir", output_dir)
