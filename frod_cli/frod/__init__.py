"""FRoD: full-rank efficient fine-tuning with rotational degrees (Wan et al., AAAI 2026).

Torch only. The math lives in basis.py (the shared basis, the sparse pattern) and layer.py (the adapted
layer); adapter.py applies, merges, saves and loads; targets.py is the one target matcher (PEFT's rule:
a list is suffixes of module paths, a single string is a regex). See API.md.
"""
from .adapter import (
    apply_frod,
    basis_report,
    disable_adapter,
    find_targets,
    frod_layers,
    load_adapter,
    merge,
    merge_and_unload,
    merge_into,
    param_groups,
    read_adapter,
    save_adapter,
    summary,
    unmerge,
)
from .accumulate import accumulate, window_buffer_bytes
from .inference import evaluation_cache, evaluation_cache_bytes
from .config import FrodConfig, FrodError
from .targets import find_linear_targets, matches as target_matches
from .layer import FrodCategory, FrodLinear

__all__ = [
    "FrodConfig", "FrodError", "FrodLinear", "FrodCategory", "apply_frod", "merge_and_unload", "merge", "unmerge",
    "save_adapter", "load_adapter", "read_adapter", "param_groups", "disable_adapter", "summary", "find_targets",
    "frod_layers", "find_linear_targets", "target_matches",
    "accumulate", "window_buffer_bytes", "evaluation_cache", "evaluation_cache_bytes", "merge_into", "basis_report",
]
