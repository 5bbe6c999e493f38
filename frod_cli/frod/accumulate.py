"""FRoD's fixed cost once per optimizer step instead of once per micro-batch (gradient accumulation).

    with accumulate(model, micro_batches=K):   # each adapted layer builds W_i + dW_i once for the window
        for batch in window:                   # K micro-batches
            loss(batch).backward()             # each adds dL/d(dW_i) to one m x n buffer per layer
    optimizer.step()                           # lambda.grad, S.grad: exactly the per-micro-batch sum

Why it is exact: within one window lambda_i and S_i do not change, so dW_i = U_i M_i V^T is the same
matrix in every micro-batch, and M_i enters dW_i linearly, so

    sum_k dL_k/dM_i = sum_k U_i^T G_ik V = U_i^T (sum_k G_ik) V,      G_ik = dL_k/d(dW_i) = dY_k^T X_k.

A layer in "materialize" order pays the build of dW_i (m n^2) and the projection U^T G V (m n^2, plus
m n^2 each for recomputing U) per micro-batch; in a window it pays them once per window, plus the
adding of G_ik (m n per micro-batch). The math lives in layer.py (`FrodLinear.effective_weight`,
`backward_delta_weight`, `prefers_window`); this module only keeps the books.

Per layer, the window is taken only where it is cheaper than the layer's own per-micro-batch order
for the window's tokens (`FrodLinear.prefers_window`, decided at the layer's first training forward in
the window, when its tokens per micro-batch are known): a layer that projects per token (mode="project",
or "auto" where V^T x per token is cheaper, e.g. BERT's intermediate.dense with U recomputed) keeps its
per-micro-batch path, which is exact anyway. With micro_batches=1 no layer takes the window.

Memory while the window is open, per windowed layer (m x n):
  - W_i + dW_i in the weights' dtype. The per-micro-batch path holds the same matrix from a forward to
    its backward; the window keeps it between micro-batches too, and freed it before projecting.
  - G_i, the summed gradient, in float32 whatever the weights' dtype: the per-micro-batch path sums the
    projected gradients in float32 (lambda.grad, S.grad are float32), and a bfloat16 buffer would round
    the running sum to 8 bits of mantissa after every micro-batch (K = 8 costs about 1.5 digits). For
    float32 weights it is the weights' dtype anyway, and for bfloat16 ones the per-micro-batch path casts
    the same gradient to a float32 m x n transient in every backward.
Nothing is registered on the model (parameters, buffers and state_dict are unchanged), and everything
is freed when the window closes. `Window.memory_bytes()` reports what is held.

Rules of a window:
  - Backward every micro-batch inside it. Gradient checkpointing recomputes with the window's W_i + dW_i:
    non-reentrant torch.utils.checkpoint (what HF's gradient_checkpointing_enable uses) rebuilds nothing;
    the reentrant kind is exact too, but its first pass runs without grad, before the layer has decided,
    so the first micro-batch runs that pass in the layer's own no-grad order (one dW build, or projecting).
  - Evaluation inside it (torch.no_grad()) gives the adapted model's outputs and touches no buffer.
  - Do not step the optimizer (or otherwise change lambda, S or the base weights) inside it: the next
    forward of a windowed layer refuses with FrodError instead of using a stale dW.
  - On normal exit the summed gradients are projected once and ADDED to lambda.grad and S.grad (like
    backward). On an exception nothing is projected, the buffers are dropped, and the layers are back
    to their plain path. A backward through a window's forward after it closed raises.
  - Windows do not nest.
  - Data parallel: the windowed layers' lambda.grad and S.grad appear at the window's exit, outside any
    backward, so DDP/FSDP gradient hooks never see them; all-reduce them after the window (or run the
    window only on a single process).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from .adapter import frod_layers
from .config import FrodError
from .layer import FrodLinear, is_conv1d, weight_dtype, weight_shape


class _LayerWindow:
    """One FrodLinear's part in an open window: its decision, W + dW and the summed gradient G."""

    def __init__(self, window: "Window", name: str, layer: FrodLinear):
        self.window = window
        self.name = name
        self.layer = layer
        self.decided = False
        self.W_eff: Optional[torch.Tensor] = None  # W_i + dW_i, base layer's layout, a leaf requiring grad
        self.G: Optional[torch.Tensor] = None  # sum over micro-batches of dL/d(W_eff), float32, same layout
        self.key = None
        self.used = False

    # called by FrodLinear.forward while the window is open
    def weight(self, layer: FrodLinear, tokens: int, training: bool) -> Optional[torch.Tensor]:
        if not self.decided:
            if not training:
                return None  # evaluation before the first training forward: the layer's own no-grad path
            self.decided = True
            # the base weight must be frozen: its own gradient would not reach it through the detached W_eff
            if not layer.base_layer.weight.requires_grad and layer.prefers_window(tokens, self.window.micro_batches):
                self._build(layer)
        if self.W_eff is None:
            return None
        if layer.version_key() != self.key:
            raise FrodError(f"{self.name}: lambda, S or the base weight changed inside an accumulate() window; "
                            "step the optimizer after the window closes")
        return self.W_eff

    def _build(self, layer: FrodLinear) -> None:
        W_eff = layer.effective_weight()  # no graph: one dW build for the whole window
        # A leaf of its own: backward deposits dL/d(W_eff) = dL/d(dW) on it, and the hook moves it into G.
        W_eff.requires_grad_(True)
        W_eff.register_post_accumulate_grad_hook(self._accumulate)
        self.W_eff, self.key, self.used = W_eff, layer.version_key(), True
        self.window.builds += 1

    def _accumulate(self, W_eff: torch.Tensor) -> None:
        g, W_eff.grad = W_eff.grad, None
        if not self.window.open:
            raise RuntimeError(f"{self.name}: backward of a forward run inside an accumulate() window that has "
                               "already closed; call backward inside the window")
        if self.G is None:
            self.G = g.float()  # float32 (module docstring); for float32 weights this keeps g itself
        else:
            self.G.add_(g)

    def project(self) -> None:
        """Hand the summed gradient to lambda_i and S_i (once per window), then free everything."""
        G, self.G, self.W_eff = self.G, None, None  # W_eff goes first: one m x n less at the peak
        if G is not None:
            self.layer.backward_delta_weight(G.T if is_conv1d(self.layer.base_layer) else G)

    def drop(self) -> None:
        self.G = self.W_eff = None


class Window:
    """What `accumulate` yields: the open window's bookkeeping, for inspection."""

    def __init__(self, micro_batches: Optional[int]):
        self.micro_batches = micro_batches
        self.parts: List[_LayerWindow] = []
        self.builds = 0  # dW builds in this window (at most one per layer)
        self.open = False

    @property
    def layers(self) -> List[str]:
        """Names of the layers that took the window (decided at their first training forward)."""
        return [p.name for p in self.parts if p.used]

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held right now: W_i + dW_i (weights' dtype) and the float32 gradient sums."""
        w = sum(p.W_eff.nbytes for p in self.parts if p.W_eff is not None)
        g = sum(p.G.nbytes for p in self.parts if p.G is not None)
        return {"weights": w, "grad_buffers": g, "total": w + g}


def window_buffer_bytes(model: nn.Module) -> int:
    """What a window holds at most (every adapted layer windowed): per layer W_i + dW_i in the weights'
    dtype and the float32 gradient sum G_i, both m x n. For deciding whether a window fits before it opens. On a
    4-bit base W_i + dW_i is in the compute dtype: four times the packed weight or more, the reason to ask."""
    total = 0
    for _, layer in frod_layers(model):
        m, n = weight_shape(layer.base_layer)
        total += m * n * (torch.empty(0, dtype=weight_dtype(layer.base_layer)).element_size() + 4)
    return total


@contextlib.contextmanager
def accumulate(model: nn.Module, micro_batches: Optional[int] = None, enabled: bool = True) -> Iterator[Window]:
    """Gradient-accumulation window over `model`'s FRoD layers (module docstring).

    micro_batches: the number of micro-batches the window will run (K), for the per-layer choice of
      order (`FrodLinear.prefers_window`); None means "many": every layer not forced to project, whose
      windowed per-token cost is below its own order's, takes the window.
    enabled=False: a no-op window (the plain per-micro-batch path), handy for a loop that accumulates
      only sometimes; a model without FRoD layers gets a no-op window too.
    Yields a `Window` (layers that took it, dW builds, memory held)."""
    window = Window(micro_batches)
    if not enabled:
        yield window
        return
    layers = list(frod_layers(model))
    if any(layer._window is not None for _, layer in layers):
        raise FrodError("accumulate() windows do not nest: this model already has one open")
    window.parts = [_LayerWindow(window, name, layer) for name, layer in layers]
    window.open = True
    for part in window.parts:
        part.layer._window = part
    projected = False
    try:
        yield window
        # normal exit: the layers go back to their plain path first, then each projects its sum once
        _detach(window)
        for part in window.parts:
            part.project()
        projected = True
    finally:
        if not projected:  # an exception inside the window (or while projecting): drop, never project
            _detach(window)
            for part in window.parts:
                part.drop()


def _detach(window: Window) -> None:
    window.open = False
    for part in window.parts:
        if part.layer._window is part:
            part.layer._window = None
