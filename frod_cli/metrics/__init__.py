"""Metrics shipped with the package as `evaluate` modules, loadable without the Hub.

`evaluate.load("accuracy")` downloads its script from the Hub; `evaluate.load(<folder>)` on one of the
folders here does not. Names are flat; each maps to a module and its arguments:

    accuracy              accuracy
    f1                    f1, average="binary" for 2 labels, "macro" otherwise
    f1_macro / f1_micro / f1_weighted
    matthews_correlation  matthews_correlation (alias mcc)
    pearson               pearsonr (alias pearsonr)
    spearmanr             spearmanr (alias spearman)
    exact_match           exact_match (strings; causal_lm normalises both sides first)
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
MODULES = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr", "exact_match")
_ALIASES = {"mcc": "matthews_correlation", "pearsonr": "pearson", "spearman": "spearmanr"}
# name -> (module, module's output key, fixed kwargs)
_SPECS = {
    "accuracy": ("accuracy", "accuracy", {}),
    "f1": ("f1", "f1", {}),
    "f1_macro": ("f1", "f1", {"average": "macro"}),
    "f1_micro": ("f1", "f1", {"average": "micro"}),
    "f1_weighted": ("f1", "f1", {"average": "weighted"}),
    "matthews_correlation": ("matthews_correlation", "matthews_correlation", {}),
    "pearson": ("pearsonr", "pearsonr", {}),
    "spearmanr": ("spearmanr", "spearmanr", {}),
    "exact_match": ("exact_match", "exact_match", {}),
}
KNOWN = tuple(sorted(set(_SPECS) | set(_ALIASES)))


def names(metrics: Iterable[str]) -> list:
    """The keys `compute` reports for these metric names (aliases resolved); an unknown name is refused."""
    out = []
    for name in metrics:
        key = _ALIASES.get(name, name)
        if key not in _SPECS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(KNOWN)}")
        out.append(key)
    return out


@functools.lru_cache(maxsize=None)
def load_metric(name: str) -> Any:
    """The `evaluate` module for `name` (a metric name above or a module folder name), loaded from the package."""
    import evaluate

    module = _SPECS[_ALIASES.get(name, name)][0] if _ALIASES.get(name, name) in _SPECS else name
    if module not in MODULES:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(KNOWN)}")
    # In memory: no Arrow cache files, so ranks of a multi-process run never share a lock file.
    return evaluate.load(str(METRICS_DIR / module), keep_in_memory=True)


def compute(names: Iterable[str], predictions: Any, references: Any, num_labels: Optional[int] = None) -> Dict[str, float]:
    """{metric name: value} for one split's predictions. `num_labels` picks f1's averaging."""
    predictions, references = np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out: Dict[str, float] = {}
    for name in names:
        key = _ALIASES.get(name, name)
        if key not in _SPECS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(KNOWN)}")
        module, result_key, kwargs = _SPECS[key]
        if key == "f1":
            binary = num_labels == 2 if num_labels is not None else set(np.unique(np.concatenate([predictions, references]))) <= {0, 1}
            kwargs = {"average": "binary" if binary else "macro"}
        out[key] = float(load_metric(module).compute(predictions=predictions, references=references, **kwargs)[result_key])
    return out
