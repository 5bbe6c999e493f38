"""Evaluation and generation with the adapter unmerged, at the merged model's speed, for a bounded time.

    with evaluation_cache(model, max_bytes=budget) as held:   # held.layers, held.bytes
        model.generate(...)        # each admitted layer multiplies by W_i + dW_i, built once for the block

Outside such a block a FRoD layer keeps nothing between calls without gradients: each call builds dW_i or
projects per token, whichever costs less for its tokens (FrodLinear.choose_mode), so training never carries
a no-grad copy of the adapted weights from one evaluation to the next. Inside, an admitted layer holds
W_i + dW_i (the base layer's layout and compute dtype; on a 4-bit base, dequant(W_q) + dW_i), the matrix the
merged model holds: built at its first call, rebuilt if lambda, S or W change, freed when the block ends.
Holding the sum rather than dW_i spares adding W_i + dW_i again in every call (an m x n read and write per
layer and generated token).

`max_bytes` bounds what is held: layers are admitted in model order while their W_i + dW_i fit, the others
keep the per-call rule. Nothing is registered on the model; blocks do not stack (an inner block leaves the
outer one's choice as it is).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from torch import nn

from .adapter import frod_layers
from .layer import FrodLinear, weight_dtype, weight_shape


@dataclass
class Held:
    """What an evaluation_cache block admitted: layer names and the bytes their W_i + dW_i take when built."""

    layers: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    bytes: int = 0


def held_bytes(layer: FrodLinear) -> int:
    """Bytes of one layer's W_i + dW_i (m x n in the compute dtype)."""
    m, n = weight_shape(layer.base_layer)
    return m * n * torch.empty(0, dtype=weight_dtype(layer.base_layer)).element_size()


def evaluation_cache_bytes(model: nn.Module) -> int:
    """What holding W_i + dW_i for every adapted layer takes: one more copy of the adapted weights (four or more
    times the packed weights on a 4-bit base)."""
    return sum(held_bytes(layer) for _, layer in frod_layers(model))


@contextlib.contextmanager
def evaluation_cache(model: nn.Module, max_bytes: Optional[int] = None) -> Iterator[Held]:
    """Let the FRoD layers of `model` hold W_i + dW_i for calls without gradients until the block ends (module
    docstring); at most `max_bytes` of them (None: every layer). Yields a `Held`."""
    layers = list(frod_layers(model))
    held = Held()
    if any(layer.hold for _, layer in layers):
        yield held  # an outer block decides
        return
    for name, layer in layers:
        size = held_bytes(layer)
        if max_bytes is None or held.bytes + size <= max_bytes:
            layer.hold = True
            held.layers.append(name)
            held.bytes += size
        else:
            held.skipped.append(name)
    try:
        yield held
    finally:
        for _, layer in layers:
            layer.hold = False
            layer.drop_cache()
