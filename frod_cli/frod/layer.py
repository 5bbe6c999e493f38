"""The adapted linear layer (FROD_METHOD.md sections 3-4).

    M_i  = diag(lambda_i - sigma_i) + S_i        zero at initialization
    dW_i = U_i M_i V^T                          entry (r, c) of S adds s_rc * u_r v_c^T
    y    = W_i x + b_i + dW_i x                 the base layer is never modified

Everything FRoD-specific runs in float32 (trainables, basis); only the base GEMM runs in the model's dtype.
Two ways to compute dW_i x, chosen per call by `FrodLinear.choose_mode` (see its docstring for the rule):
  materialize  dW_i is built once (m n^2 with a stored U, 2 m n^2 recomputing U) and added to W_i; one
               GEMM per token. In no-grad calls dW_i is cached until the trainable values change.
  project      per token: z = V^T x, t = M z, dx = V^-T diag(1/sigma) t, y = W (x + dx) + b, which
               is dW x = W V^-T diag(1/sigma) M V^T x = U M V^T x without any m x n tensor.
Inside an `accumulate(model)` window (accumulate.py) a layer may instead use W_i + dW_i built once for the
whole window and hand back dL/d(dW_i) summed over its micro-batches; `effective_weight`,
`backward_delta_weight` and `prefers_window` below are the math of that, accumulate.py the bookkeeping.
Without gradients nothing is kept between calls: each call takes the cheaper order for its tokens, unless an
`evaluation_cache(model)` block (inference.py) lets the layer hold W_i + dW_i for the block.

A 4-bit base (bitsandbytes Linear4bit, NF4 or FP4) is read through `weight_of`, which returns
W_i = dequant(W_q) in the layer's compute dtype as a fresh tensor: the same matrix bitsandbytes multiplies by.
The basis, U_i, dW_i and the merge all use it; nothing dequantized is kept between calls, and the
materialized training order rebuilds W_i + dW_i in the backward instead of saving it (`_RebuiltWeight`), as
bitsandbytes' own 4-bit matmul dequantizes W again in its backward.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import FrodError

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D (weight stored fan_in x fan_out), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def quant_state_of(module: nn.Module):
    """The bitsandbytes quantization state of a 4-bit linear layer (Linear4bit, NF4 or FP4), None for a plain one.
    It rides on the weight; under FSDP2 the weight is a shard (a DTensor) or, inside the layer's unit's forward and
    backward, the all-gathered packed bytes as a plain tensor, and neither carries it: bitsandbytes keeps it on the
    module too (`Linear4bit.quant_state`), where the FSDP-QLoRA route reads it back."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer: its weight is packed bytes with a quantization state."""
    return quant_state_of(module) is not None


def quantization_of(module: nn.Module) -> Optional[str]:
    """"nf4" or "fp4" for a 4-bit layer, None for a plain one."""
    return str(quant_state_of(module).quant_type) if is_4bit(module) else None


def weight_shape(module: nn.Module) -> Tuple[int, int]:
    """(out, in) of W, without reading (or dequantizing) it."""
    if is_4bit(module):
        m, n = quant_state_of(module).shape
        return int(m), int(n)
    a, b = module.weight.shape
    return (int(b), int(a)) if is_conv1d(module) else (int(a), int(b))


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype W is multiplied in: a 4-bit layer's compute dtype, else the stored weight's."""
    if is_4bit(module):
        return getattr(module, "compute_dtype", None) or quant_state_of(module).dtype
    return module.weight.dtype


def weight_version(module: nn.Module) -> tuple:
    """Changes whenever the stored weight does (an in-place update, another tensor, device or dtype): the key of
    anything built from W."""
    w = module.weight
    return (w._version, w.data_ptr(), w.device, w.dtype)


def weight_of(module: nn.Module) -> torch.Tensor:
    """W in torch layout (out x in): a view of the stored weight; for a 4-bit layer dequant(W_q), a fresh tensor
    in its compute dtype (the matrix its forward multiplies by), built on each call and kept by nobody."""
    if is_4bit(module):
        return _dequantize(module)
    return module.weight.T if is_conv1d(module) else module.weight


def _dequantize(module: nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    w, state = module.weight, quant_state_of(module)
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPU inference (absmax in bfloat16); its way back
        # re-quantizes absmax, so the packed weight no longer reads back as the W the adapter was built on.
        raise FrodError("a 4-bit layer was repacked by bitsandbytes for CPU inference and cannot be read back "
                        "exactly: set support_avx512bf16_for_cpu = False on the Linear4bit layers before the "
                        "first evaluation (frod_cli.models does), or adapt the model before evaluating it")
    with torch.no_grad():
        # a sharded weight outside its unit's forward: the packed bytes gathered first (a collective)
        packed = w.full_tensor() if hasattr(w, "full_tensor") else w.data
        return dequantize_4bit(packed, state).to(weight_dtype(module))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    # The index arrays are fixed per category; only the values change, so nothing is sorted or coalesced here.
    return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


class _SparseRows(torch.autograd.Function):
    """out = A X for the n x n pattern matrix A whose entries are the trainable values s; X is (n x R).

    `fwd` = (crow, col, perm) is A in CSR (entry p of the CSR holds s[perm[p]]); `bwd` is A^T the same way.
    Forward and the input gradient are sparse x dense products (k R multiply-adds), the value gradient
    <g[i], X[j]> over the pattern is a sampled dense-dense product: nothing of size k x R is materialized."""

    @staticmethod
    def forward(ctx, X, s, fwd, bwd):
        n = X.shape[0]
        ctx.fwd, ctx.bwd = fwd, bwd
        ctx.save_for_backward(X, s)
        return torch.sparse.mm(_csr(fwd[0], fwd[1], _take(s, fwd[2]).to(X.dtype), n), X)

    @staticmethod
    def backward(ctx, g):
        X, s = ctx.saved_tensors
        n = X.shape[0]
        g = g.contiguous()
        gX = gs = None
        if ctx.needs_input_grad[0]:
            crow, col, perm = ctx.bwd
            gX = torch.sparse.mm(_csr(crow, col, _take(s, perm).to(X.dtype), n), g)
        if ctx.needs_input_grad[1]:
            crow, col, perm = ctx.fwd
            pattern = _csr(crow, col, torch.zeros(col.numel(), dtype=X.dtype, device=X.device), n)
            vals = torch.sparse.sampled_addmm(pattern, g, X.T, beta=0.0).values()
            if perm is None:
                gs = vals.to(s.dtype)
            else:
                gs = torch.empty_like(s)
                gs[perm] = vals.to(s.dtype)
        return gX, gs, None, None


def _take(s: torch.Tensor, perm) -> torch.Tensor:
    return s if perm is None else s[perm]


def sparse_rows(X: torch.Tensor, s: torch.Tensor, fwd, bwd) -> torch.Tensor:
    if s.numel() == 0:
        return torch.zeros_like(X) + 0 * s.sum()  # keep s in the graph so it gets a (zero) gradient
    with torch.autocast(X.device.type, enabled=False):
        return _SparseRows.apply(X, s, fwd, bwd)


class _KeepOwnTensors(nn.Module):
    """Moves this module's own float32 tensors between devices but never changes their dtype, so
    `model.half()` or `model.to(torch.bfloat16)` leaves FRoD's trainables and basis in float32."""

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        for store in (self._parameters, self._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                if t.device != device:
                    with torch.no_grad():
                        moved = t.data.to(device)
                    if isinstance(t, nn.Parameter):
                        t.data = moved
                        if t.grad is not None:
                            t.grad.data = t.grad.data.to(device)
                    else:
                        store[key] = moved
        return self


def _crow(index: torch.Tensor, n: int) -> torch.Tensor:
    crow = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.cumsum(torch.bincount(index.long(), minlength=n), 0)
    return crow.to(index.dtype)


class _RebuiltWeight(torch.autograd.Function):
    """The materialized training order on a 4-bit base: y = x (W + dW)^T saving only x. The backward dequantizes W
    and builds dW again (bitsandbytes' own 4-bit matmul dequantizes W again too), so no m x n tensor lives from
    the forward to the backward: dL/dx = g (W + dW), and lambda_i, S_i get their gradients from G = g^T x."""

    @staticmethod
    def forward(ctx, x, lam, s, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer.with_weight(x, layer.effective_weight())

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = None
        if ctx.needs_input_grad[0]:
            W_eff = layer.effective_weight()
            gx = (g2.to(W_eff.dtype) @ W_eff).to(x.dtype).reshape(x.shape)
            del W_eff  # before G: one m x n at a time
        G = g2.T.float() @ x2.float()  # dL/d(dW_i), m x n
        glam, gs = layer.delta_grads(G, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, glam, gs, None


class FrodCategory(_KeepOwnTensors):
    """What the members of one category share: V, V^-T (None when V is singular) and the pattern of S."""

    def __init__(self, key: str, V: torch.Tensor, V_inv_T: Optional[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor):
        super().__init__()
        self.key = key
        self.n = V.shape[0]
        self.register_buffer("V", V.detach().float().contiguous())
        self.register_buffer("V_inv_T", None if V_inv_T is None else V_inv_T.detach().float().contiguous())
        # int32 indices (half the bytes; n < 2^31), canonical order: row-major position r * n + c.
        rows, cols = rows.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous()
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        # CSR views of the pattern, derived (not saved): by row r (the canonical order, so its value
        # permutation is the identity) and by column c.
        self.register_buffer("crow_r", _crow(rows, self.n), persistent=False)
        perm_c = torch.argsort(cols.long() * self.n + rows.long())
        self.register_buffer("crow_c", _crow(cols, self.n), persistent=False)
        self.register_buffer("rows_by_c", rows[perm_c].contiguous(), persistent=False)
        self.register_buffer("perm_c", perm_c, persistent=False)

    @property
    def by_row(self):
        """A[r, c] = s_rc: applies M's off-diagonal part to a column stack, (S z)_r = sum_c s_rc z_c."""
        return (self.crow_r, self.cols, None)

    @property
    def by_col(self):
        """A[c, r] = s_rc, i.e. S^T: moves row r of U^T into row c, (U S)^T = S^T U^T."""
        return (self.crow_c, self.rows_by_c, self.perm_c)

    @property
    def k(self) -> int:
        return self.rows.numel()


class FrodLinear(_KeepOwnTensors):
    """Wraps an nn.Linear, a GPT-2 Conv1D or a bitsandbytes Linear4bit; the wrapped layer stays as `base_layer`,
    its weights untouched."""

    # The open accumulate() window this layer belongs to (accumulate.py sets and clears it); a class-level
    # default so that the per-micro-batch path only pays one attribute read.
    _window = None
    # Set by evaluation_cache() (inference.py) for the block: calls without gradients may hold W + dW.
    hold = False

    def __init__(self, base_layer: nn.Module, category: FrodCategory, sigma: torch.Tensor,
                 U_t: Optional[torch.Tensor] = None, mode: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = weight_shape(base_layer)
        self.quantized = is_4bit(base_layer)
        if self.quantized:
            # bitsandbytes would repack the weight at the first CPU evaluation on AVX512-BF16 machines, after which
            # it no longer reads back exactly (see _dequantize) and its backward is wrong; keep one format.
            base_layer.support_avx512bf16_for_cpu = False
        device = base_layer.weight.device
        if device.type == "meta":  # a process that receives the base's weights later (train.fsdp.load_on_rank0)
            device = sigma.device
        # The category is shared by several layers: hold it without registering it as a child.
        object.__setattr__(self, "category", category)
        self.mode = mode
        sigma = sigma.detach().float().to(device)
        self.register_buffer("frod_sigma", sigma.clone())
        # U_i^T (n x m) when it cannot be (or was asked not to be) recomputed from W_i.
        self.register_buffer("frod_U_t", None if U_t is None else U_t.detach().float().contiguous().to(device))
        self.frod_lambda = nn.Parameter(sigma.clone())  # lambda_i starts at sigma_i
        self.frod_s = nn.Parameter(torch.zeros(category.k, dtype=torch.float32, device=device))
        self.disabled = False
        self.merged = False
        self._unmerged_weight: Optional[torch.Tensor] = None  # merged plain layer: W before the merge
        self._merged_weight: Optional[torch.Tensor] = None  # merged 4-bit layer: W + dW (the packed W cannot hold it)
        self._held = None  # (version key, W + dW) inside evaluation_cache()

    # ---- pieces of the math -------------------------------------------------------------------
    @property
    def inv_sigma(self) -> torch.Tensor:
        # sigma_ik = 0 only for inert directions (u_k = 0); 1/0 is replaced by 0 there.
        s = self.frod_sigma
        return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))

    def U_t(self) -> torch.Tensor:
        """U_i^T (n x m), float32: stored, or recomputed as diag(1/sigma_i) V^-1 W_i^T (U_i = W_i V^-T diag(1/sigma_i))."""
        if self.frod_U_t is not None:
            return self.frod_U_t
        W = weight_of(self.base_layer).detach()
        return (self.category.V_inv_T.T @ W.T.float()) * self.inv_sigma[:, None]

    @property
    def U(self) -> torch.Tensor:
        return self.U_t().T

    def um_t(self) -> torch.Tensor:
        """(U_i M_i)^T (n x m, float32), differentiable in lambda_i and s_i."""
        Ut = self.U_t()
        d = self.frod_lambda - self.frod_sigma
        cat = self.category
        # (U M)^T = M^T U^T: diag part scales rows of U^T, entry (r, c) of S moves row r into row c.
        return Ut * d[:, None] + sparse_rows(Ut, self.frod_s, cat.by_col, cat.by_row)

    def delta_weight(self) -> torch.Tensor:
        """dW_i = U_i M_i V^T (m x n, float32), differentiable in lambda_i and s_i."""
        return self.um_t().T @ self.category.V.T  # (U M) V^T, written straight into the m x n layout of W

    def version_key(self) -> tuple:
        """Changes whenever lambda_i, S_i or the base weight do: the key of anything built from W + dW."""
        return (self.frod_lambda._version, self.frod_s._version) + weight_version(self.base_layer)

    # ---- one build per accumulation window (used by accumulate.py) ------------------------------
    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_i + dW_i in the base layer's own layout (n x m for Conv1D) and compute dtype, without a graph: the
        matrix the materialized forward multiplies by, bit for bit (`_linear` forms the same sum)."""
        base = self.base_layer
        dW = self.delta_weight().to(weight_dtype(base))
        if self.quantized:
            return weight_of(base).add_(dW)  # a fresh dequantized W: add in place, one m x n less
        return base.weight + (dW.T if is_conv1d(base) else dW)

    def backward_delta_weight(self, G: torch.Tensor) -> None:
        """Add dL/dlambda_i and dL/ds_i to their .grad, given G = dL/d(dW_i) (m x n, any float dtype).

        dW_i = (U_i M_i) V^T, so dL/d(U_i M_i) = G V; autograd carries it through (U_i M_i)^T = M_i^T U_i^T
        to the diagonal (lambda_i) and the pattern entries (s_i): dL/dM_i = U_i^T G V, the same products the
        per-micro-batch backward runs. M_i enters dW_i linearly, so G may be a sum over micro-batches."""
        with torch.enable_grad():
            CT = self.um_t()
            torch.autograd.backward(CT, (G.float() @ self.category.V).T)

    def delta_grads(self, G: torch.Tensor, need_lambda: bool = True, need_s: bool = True):
        """(dL/dlambda_i, dL/ds_i) given G = dL/d(dW_i): backward_delta_weight's math, returned (None where not
        needed) instead of added to .grad, for use inside an autograd Function's backward."""
        wanted = [p for p, need in ((self.frod_lambda, need_lambda), (self.frod_s, need_s)) if need]
        if not wanted:
            return None, None
        with torch.enable_grad():
            CT = self.um_t()
            grads = iter(torch.autograd.grad(CT, wanted, (G.float() @ self.category.V).T, allow_unused=True))
        return (next(grads) if need_lambda else None), (next(grads) if need_s else None)

    def project(self, x2: torch.Tensor) -> torch.Tensor:
        """dW_i x for a batch of rows x2 (T x n), per token. Returns dx with W dx = dW x when U is
        recomputable (the caller then runs the base layer on x + dx), or dW x itself when U is stored."""
        cat = self.category
        zt = cat.V.T @ x2.T.float()  # z = V^T x, one column per token
        d = self.frod_lambda - self.frod_sigma
        tt = zt * d[:, None] + sparse_rows(zt, self.frod_s, cat.by_row, cat.by_col)  # t = M z
        if self.frod_U_t is not None:
            return (tt.T @ self.frod_U_t)  # U t
        return (cat.V_inv_T @ (tt * self.inv_sigma[:, None])).T  # V^-T diag(1/sigma) t

    # ---- mode choice ---------------------------------------------------------------------------
    def _build_cost(self) -> int:
        """Multiply-adds of one dW build: m n^2 from a stored U, 2 m n^2 recomputing U from W."""
        m, n = self.out_features, self.in_features
        return (1 if self.frod_U_t is not None else 2) * m * n * n

    def _step_costs(self, tokens: int):
        """(materialize, project) multiply-adds of one training call with `tokens` tokens (choose_mode's rule)."""
        m, n, T = self.out_features, self.in_features, tokens
        u_stored = self.frod_U_t is not None
        mat = self._build_cost() + m * n * n + T * m * n
        if self.quantized:
            mat += self._build_cost()  # W + dW is rebuilt in the backward instead of being kept (_RebuiltWeight)
        proj = (2 * T * n * n + 2 * T * m * n) if u_stored else 4 * T * n * n
        return mat, proj

    def _call_costs(self, tokens: int):
        """(materialize, project) multiply-adds of one call without gradients, beyond the base GEMM."""
        m, n, T = self.out_features, self.in_features, tokens
        proj = (T * n * n + T * m * n) if self.frod_U_t is not None else 2 * T * n * n
        return self._build_cost(), proj

    def choose_mode(self, tokens: int, training: bool) -> str:
        """Pick the cheaper evaluation order for this call, counting multiply-adds beyond the base GEMMs.

        materialize: building dW costs m n^2 (plus m n^2 to recompute U when it is not stored); training
        adds the weight gradient of W + dW (T m n) and its projection onto the basis (m n^2), and on a 4-bit
        base a second build in the backward, since W + dW is not kept for it (memory: no m x n tensor saved).
        project (U recomputed): V^T x and V^-T t forward and backward, 4 T n^2 (2 T n^2 without grad).
        project (U stored): 2 T n^2 + 2 T m n (T n^2 + T m n without grad).
        Without gradients nothing is kept between calls (so a few decoded tokens project); inside
        evaluation_cache() a held W + dW serves every call instead (forward)."""
        if self.mode != "auto":
            return self.mode
        mat, proj = self._step_costs(tokens) if training else self._call_costs(tokens)
        return "materialize" if mat <= proj else "project"

    def prefers_window(self, tokens: int, micro_batches: Optional[float]) -> bool:
        """Whether building W_i + dW_i once for a window of `micro_batches` micro-batches of `tokens` tokens
        costs less than this layer's own per-micro-batch order (choose_mode) over the window.

        window: once per window, dW (m n^2, plus m n^2 recomputing U) and the projection of its summed
          gradient at the exit, G V (m n^2, plus m n^2 recomputing U again: U is not kept, which would
          cost another m x n buffer per layer); per micro-batch, the weight gradient dY^T X added to the
          window's buffer (T m n). Per micro-batch that is fixed / K + T m n.
        own order: choose_mode's cost (`_step_costs`) in every micro-batch.
        So with U stored the window wins for any K > 1; recomputing U it wins for K >= 2 wherever
        materialize wins per micro-batch, and against project (4 T n^2 per micro-batch) only while
        T m n + fixed / K < 4 T n^2, never for m >= 4 n (BERT's intermediate.dense keeps projecting).
        A forced mode="project" keeps its order. micro_batches=None means "many": fixed / K -> 0."""
        if self.mode == "project":
            return False
        m, n, T = self.out_features, self.in_features, tokens
        u = 0 if self.frod_U_t is not None else m * n * n
        fixed = 2 * u + 2 * m * n * n
        K = math.inf if micro_batches is None else max(1, micro_batches)
        window = fixed / K + T * m * n
        mat, proj = self._step_costs(tokens)
        per_micro_batch = mat if self.choose_mode(tokens, True) == "materialize" else proj
        return window < per_micro_batch

    # ---- forward ----------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
        """The base layer's own op with W + dW, so that dW == 0 reproduces it bit for bit (plain bases)."""
        base = self.base_layer
        return self.with_weight(x, base.weight + (dW.T if is_conv1d(base) else dW))

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's own op with `weight` (in the base layer's layout) in place of its weight. A 4-bit
        layer computes in its compute dtype and hands back the input's, as bitsandbytes does."""
        base = self.base_layer
        if is_conv1d(base):
            y = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), weight)
            return y.reshape(*x.shape[:-1], self.out_features)
        if x.dtype != weight.dtype and self.quantized:
            bias = None if base.bias is None else base.bias.to(weight.dtype)
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        return F.linear(x, weight, base.bias)

    def drop_cache(self) -> None:
        """Forget the W + dW held for calls without gradients (an m x n tensor); the next such call rebuilds it."""
        self._held = None

    def _held_weight(self) -> torch.Tensor:
        key = self.version_key()
        if self._held is None or self._held[0] != key:
            self._held = None  # the stale one goes first: one m x n at the peak
            self._held = (key, self.effective_weight())
        return self._held[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            if self._merged_weight is not None and not self.disabled:
                return self.with_weight(x, self._merged_weight)
            return self.base_layer(x)
        training = torch.is_grad_enabled() and (self.frod_lambda.requires_grad or self.frod_s.requires_grad)
        tokens = x.numel() // self.in_features
        if self._window is not None:
            # inside accumulate(): W + dW of the window when this layer takes part (None: it keeps its own order)
            W_eff = self._window.weight(self, tokens, training)
            if W_eff is not None:
                return self.with_weight(x, W_eff)
        if not training and self.hold:
            return self.with_weight(x, self._held_weight())
        if self.choose_mode(tokens, training) == "materialize":
            if not training:
                return self.with_weight(x, self.effective_weight())
            if self.quantized:
                return _RebuiltWeight.apply(x, self.frod_lambda, self.frod_s, self)
            return self._linear(x, self.delta_weight().to(weight_dtype(self.base_layer)))
        x2 = x.reshape(-1, self.in_features)
        out = self.project(x2)
        if self.frod_U_t is not None:
            return self.base_layer(x) + out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return self.base_layer((x2 + out.to(x.dtype)).reshape(x.shape))

    # ---- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.quantized:
            self._merged_weight = self.effective_weight()
        else:
            W = weight_of(self.base_layer)
            dW = self.delta_weight().to(W.dtype)
            self._unmerged_weight = self.base_layer.weight.detach().clone()
            W.add_(dW)  # W is a view of the stored weight (transposed for Conv1D)
        self.merged = True
        self.drop_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)  # exact: the pre-merge weight was kept
        self._unmerged_weight = self._merged_weight = None
        self.merged = False
        self.drop_cache()

    def extra_repr(self) -> str:
        base = f", base={quantization_of(self.base_layer)}" if self.quantized else ""
        return (f"in={self.in_features}, out={self.out_features}, category={self.category.key!r}, "
                f"k={self.category.k}, mode={self.mode}, "
                f"U={'stored' if self.frod_U_t is not None else 'recomputed'}{base}")
