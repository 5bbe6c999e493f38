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
    backward, so DDP/FSDP gradient hooks never see them; average them over the ranks after the window (or run
    the window only on a single process).

Sharded weights (FSDP2's fully_shard: W_i a DTensor whose rank-local part is a block of rows, R_r). A rank holds
its rows of W_i only, and FSDP gathers the whole W_i from all ranks' rows in each forward (and again in the
backward). So the window goes into the shards instead of beside the forward:
  - at the open, before any forward, each rank forms its rows of U_i from its own rows of W_i (U_i = W_i V^-T
    diag(1/sigma_i) holds row by row; a stored U_i is sliced) and writes W_i + dW_i into its rows, keeping
    the original rows aside: FSDP then gathers W_i + dW_i for every forward and backward of the window, and
    the layer multiplies by what it was given;
  - the weight requires grad for the window: FSDP reduce-scatters dL/d(W_i + dW_i) = G into the ranks' rows
    after every micro-batch's backward (averaged over the ranks, its rule; the window keeps this reduction on
    even inside the loop's no_sync), and a hook adds each rank's rows to a float32 sum, G_r;
  - at the exit the original rows go back (bit for bit: they were copied, not recomputed), and each rank adds
    its rows' share of the projection, world x U_r^T G_r V (the world undoes FSDP's average), to lambda.grad and
    S.grad: the shares of all ranks sum to U_i^T (sum over ranks and micro-batches of G) V, so the average over
    the ranks that the loop runs after a window anyway (one all-reduce of the n + nnz values per layer) gives
    exactly the data-parallel gradient. A rank's own lambda.grad is a share, not its data's gradient.
  - Per rank it holds, per windowed layer, its rows of W_i (weights' dtype) and of G (float32): one shard each,
    (e + 4) ceil(m / world) n bytes at most (rank 0 has the most rows), `window_buffer_bytes(model)`.
  - Every rank must take the same decision per layer (they gather each other's rows), and it is made at the
    open, before the tokens of the window are seen: from the tokens of each layer's last windowed forward,
    agreed over the ranks (one small all-reduce per window; the first window counts as "many tokens").
  - Not sharded this way: GPT-2's Conv1D (its weight is stored in x out, so a rank holds columns of W_i, whose
    U rows need all of W_i) and 4-bit bases (packed weights): such layers keep their per-micro-batch order.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .adapter import frod_layers
from .config import FrodError
from .layer import FrodLinear, is_4bit, is_conv1d, weight_dtype, weight_shape


class _LayerWindow:
    """One FrodLinear's part in an open window: its decision, W + dW and the summed gradient G."""

    def __init__(self, window: "Window", name: str, layer: FrodLinear, eligible: bool = True):
        self.window = window
        self.name = name
        self.layer = layer
        self.decided = not eligible  # not eligible: decided already, never to take the window
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
        self.G = _add_to_sum(self.window, self.name, self.G, g)

    def project(self) -> None:
        """Hand the summed gradient to lambda_i and S_i (once per window), then free everything."""
        G, self.G, self.W_eff = self.G, None, None  # W_eff goes first: one m x n less at the peak
        if G is not None:
            self.layer.backward_delta_weight(G.T if is_conv1d(self.layer.base_layer) else G)

    def drop(self) -> None:
        self.G = self.W_eff = None

    def held(self) -> Tuple[int, int]:
        return (0 if self.W_eff is None else self.W_eff.nbytes), (0 if self.G is None else self.G.nbytes)


def _add_to_sum(window: "Window", name: str, G: Optional[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """G + g, the running float32 sum of a window's gradients (module docstring: why float32)."""
    if not window.open:
        raise RuntimeError(f"{name}: backward of a forward run inside an accumulate() window that has "
                           "already closed; call backward inside the window")
    if G is None:
        return g.float()  # for float32 weights this keeps g itself
    return G.add_(g)


class _ShardWindow:
    """One FrodLinear's part in a window over FSDP-sharded weights (module docstring): this rank's rows of
    W_i + dW_i written into its shard for the window, the gradient of those rows summed, their share of the
    projection at the exit."""

    def __init__(self, window: "Window", name: str, layer: FrodLinear, rows: slice, world: int):
        self.window, self.name, self.layer = window, name, layer
        self.param = layer.base_layer.weight  # the sharded parameter (FSDP swaps the module's attribute in forwards)
        self.rows, self.world = rows, world  # this rank's rows of W_i, over `world` ranks
        self.used = False
        self.saved: Optional[torch.Tensor] = None  # this rank's rows of W_i as they were, restored at the exit
        self.G: Optional[torch.Tensor] = None  # float32 sum of the gradient of those rows
        self.key = None
        self.hook = None
        self.grad_dtype = None

    def weight(self, layer: FrodLinear, tokens: int, training: bool) -> Optional[torch.Tensor]:
        if training:
            layer.window_tokens = tokens  # for the next window's decision
        if not self.used:
            return None
        if self.key != (layer.frod_lambda._version, layer.frod_s._version):
            raise FrodError(f"{self.name}: lambda or S changed inside an accumulate() window; step the optimizer "
                            "after the window closes")
        return layer.base_layer.weight  # what FSDP gathered for this forward: W_i + dW_i

    @torch.no_grad()
    def open(self) -> None:
        layer, p = self.layer, self.param
        local = p.to_local()
        self.saved = local.clone()
        if local.numel():
            on = layer.frod_sigma.device  # the basis' device (the shard may be offloaded to the CPU)
            dW = layer.delta_weight(layer.U_t_rows(local.to(on), self.rows))
            local.add_(dW.to(device=local.device, dtype=local.dtype))
        p.requires_grad_(True)
        # FSDP may hand the gradient over in the gathered weight's dtype (bf16 under mixed precision); the sum is
        # float32 anyway (_add_to_sum), so any dtype is accepted here
        self.grad_dtype, p.grad_dtype = p.grad_dtype, None
        self.hook = p.register_post_accumulate_grad_hook(self._accumulate)
        self.key = (layer.frod_lambda._version, layer.frod_s._version)
        self.used = True
        self.window.builds += 1

    def _accumulate(self, p: torch.Tensor) -> None:
        g, p.grad = p.grad.to_local(), None
        if self.G is None and g.dtype == torch.float32:
            g = g.clone()  # FSDP's reduce-scatter output holds the unit's other gradients too: keep ours only
        self.G = _add_to_sum(self.window, self.name, self.G, g)

    @torch.no_grad()
    def _restore(self) -> None:
        """This rank's rows of W_i back as they were, the weight frozen again (also after an exception)."""
        if self.hook is None:
            return  # never opened, or restored already
        self.hook.remove()
        self.hook = None
        p = self.param
        p.grad = None
        p.requires_grad_(False)
        p.grad_dtype = self.grad_dtype
        p.to_local().copy_(self.saved)
        self.saved = None

    def project(self) -> None:
        """This rank's rows' share of the projection, added to lambda_i's and S_i's .grad; the rows restored."""
        self._restore()
        G, self.G = self.G, None
        layer = self.layer
        if G is not None and G.numel() == 0:  # no rows here (m < ranks): a zero share, but a share
            for p in (layer.frod_lambda, layer.frod_s):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        elif G is not None:
            on = layer.frod_sigma.device
            Ut = layer.U_t_rows(self.param.to_local().to(on), self.rows)
            layer.backward_delta_weight(G.to(on).mul_(self.world), Ut)

    def drop(self) -> None:
        self._restore()
        self.G = None

    def held(self) -> Tuple[int, int]:
        return (0 if self.saved is None else self.saved.nbytes), (0 if self.G is None else self.G.nbytes)


class Window:
    """What `accumulate` yields: the open window's bookkeeping, for inspection."""

    def __init__(self, micro_batches: Optional[int]):
        self.micro_batches = micro_batches
        self.parts: List = []  # a _LayerWindow or a _ShardWindow per FRoD layer
        self.builds = 0  # dW builds in this window (at most one per layer)
        self.open = False
        self.hooks: List = []  # forward hooks of a window over sharded weights, removed at the exit

    @property
    def layers(self) -> List[str]:
        """Names of the layers that took the window (decided at their first training forward; sharded: at the open)."""
        return [p.name for p in self.parts if p.used]

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held right now: W_i + dW_i (weights' dtype; sharded: this rank's original rows of W_i) and the
        float32 gradient sums."""
        w = sum(p.held()[0] for p in self.parts)
        g = sum(p.held()[1] for p in self.parts)
        return {"weights": w, "grad_buffers": g, "total": w + g}


def is_sharded(layer: FrodLinear) -> bool:
    """Whether FSDP shards the layer's weight (a DTensor outside the forward)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(layer.base_layer.weight, DTensor)


def shard_rows(layer: FrodLinear) -> Optional[Tuple[slice, int]]:
    """(this rank's rows of W_i, the number of ranks) when FSDP shards the layer's weight by rows (fully_shard's
    Shard(0) of an nn.Linear weight, out x in), so that a window can go into the shard; else None. A Conv1D's
    weight (in x out) is sharded by columns of W_i, a 4-bit one is packed: neither can."""
    base = layer.base_layer
    if not is_sharded(layer) or is_conv1d(base) or is_4bit(base):
        return None
    w = base.weight
    if len(w.placements) != 1 or not w.placements[0].is_shard(0):
        return None
    mesh = w.device_mesh
    world, rank, m = mesh.size(), mesh.get_local_rank(), w.shape[0]
    chunk = math.ceil(m / world)  # torch.chunk's rule, FSDP's
    start = min(rank * chunk, m)
    rows = slice(start, start + w.to_local().shape[0])
    return (rows, world) if rows.stop == min(start + chunk, m) else None


def window_buffer_bytes(model: nn.Module, world: Optional[int] = None, layers: Optional[List[str]] = None) -> int:
    """What a window holds at most on this process (every adapted layer windowed), for deciding whether one fits
    before it opens. Per layer (m x n): W_i + dW_i in the weights' dtype and the float32 gradient sum G_i, both
    m x n; on a 4-bit base W_i + dW_i is in the compute dtype: four times the packed weight or more. A layer
    sharded by FSDP (`shard_rows`) holds one shard of each: ceil(m / world) rows, rank 0's share, the largest.
    world: count every layer as sharded over this many processes (for planning a launch; Conv1D and 4-bit
    layers cannot be, and count 0); None: as the model is. layers: only these (names, e.g. a Window's `layers`)."""
    total = 0
    for name, layer in frod_layers(model):
        if layers is not None and name not in layers:
            continue
        base = layer.base_layer
        m, n = weight_shape(base)
        if world is None:
            shard = shard_rows(layer)
            if shard is None and is_sharded(layer):
                continue  # keeps its per-micro-batch order
            ranks = 1 if shard is None else shard[1]
        else:
            ranks = world
            if ranks > 1 and (is_conv1d(base) or is_4bit(base)):
                continue
        total += math.ceil(m / ranks) * n * (torch.empty(0, dtype=weight_dtype(base)).element_size() + 4)
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
    window.parts = [_part(window, name, layer) for name, layer in layers]
    window.open = True
    for part in window.parts:
        part.layer._window = part
    projected = False
    try:
        _open_shards(window, model)
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
        _close_shards(window, model)


def _part(window: Window, name: str, layer: FrodLinear):
    shard = shard_rows(layer)
    if shard is not None:
        return _ShardWindow(window, name, layer, *shard)
    # a sharded weight that cannot hold the window (Conv1D, 4-bit) keeps its per-micro-batch order: outside
    # the forward this rank has a shard of W_i only, and W_i + dW_i cannot be built beside it
    return _LayerWindow(window, name, layer, eligible=not is_sharded(layer))


def _open_shards(window: Window, model: nn.Module) -> None:
    """The layers over sharded weights decide and build at the open, before FSDP gathers anything (module
    docstring); their FSDP units keep reducing gradients in every backward of the window and start from shards."""
    parts = [p for p in window.parts if isinstance(p, _ShardWindow)]
    if not parts:
        return
    for part, tokens in zip(parts, _agreed_tokens(parts)):
        layer = part.layer
        # the base weight must be frozen: the window takes over its gradient
        if not part.param.requires_grad and layer.prefers_window(tokens, window.micro_batches, part.world):
            part.open()
    units = _fsdp_units(model, [p.layer for p in parts if p.used])
    for unit in _fsdp_units(model, [p.layer for p in parts]):
        unit.reshard()  # nothing gathered from the shards before they changed is used again
    for unit in units:
        # the loop's no_sync (Accelerate's) turns FSDP's reduce-scatter off for the whole model; without it each
        # rank would keep a whole unsharded gradient per weight until the window's last backward
        window.hooks.append(unit.register_forward_pre_hook(_keep_gradient_sync))


def _keep_gradient_sync(unit: nn.Module, args) -> None:
    unit.set_requires_gradient_sync(True, recurse=False)


def _close_shards(window: Window, model: nn.Module) -> None:
    if not window.hooks and not any(isinstance(p, _ShardWindow) for p in window.parts):
        return
    for hook in window.hooks:
        hook.remove()
    window.hooks = []
    for unit in _fsdp_units(model, [p.layer for p in window.parts if isinstance(p, _ShardWindow)]):
        unit.reshard()  # W_i + dW_i gathered inside the window is not used after it


def _agreed_tokens(parts: List[_ShardWindow]) -> List[Optional[int]]:
    """Per layer, the largest of the ranks' tokens in its last windowed forward (None where no rank has one):
    one all-reduce, so that every rank decides alike."""
    import torch.distributed as dist

    mesh = parts[0].param.device_mesh
    seen = torch.tensor([p.layer.window_tokens or 0 for p in parts], dtype=torch.long,
                        device=torch.device(mesh.device_type))
    dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return [int(t) or None for t in seen.tolist()]


def _fsdp_units(model: nn.Module, layers: List[FrodLinear]) -> List[nn.Module]:
    """The FSDP units (fully_shard modules) whose parameters include these layers' weights: each layer's
    nearest enclosing unit, in model order."""
    from torch.distributed.fsdp import FSDPModule

    owner: Dict[int, nn.Module] = {}
    for module in model.modules():  # parents before children: the nearest unit is written last
        if isinstance(module, FSDPModule):
            for sub in module.modules():
                owner[id(sub)] = module
    units: Dict[int, nn.Module] = {}
    for layer in layers:
        unit = owner.get(id(layer.base_layer))
        if unit is not None:
            units[id(unit)] = unit
    return list(units.values())


def _detach(window: Window) -> None:
    window.open = False
    for part in window.parts:
        if part.layer._window is part:
            part.layer._window = None
