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
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D (weight stored fan_in x fan_out), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def weight_of(module: nn.Module) -> torch.Tensor:
    """W in torch layout (out x in) as a view."""
    return module.weight.T if is_conv1d(module) else module.weight


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
    """Wraps an nn.Linear or a GPT-2 Conv1D; the wrapped layer stays as `base_layer`, untouched."""

    # The open accumulate() window this layer belongs to (accumulate.py sets and clears it); a class-level
    # default so that the per-micro-batch path only pays one attribute read.
    _window = None

    def __init__(self, base_layer: nn.Module, category: FrodCategory, sigma: torch.Tensor,
                 U_t: Optional[torch.Tensor] = None, mode: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        W = weight_of(base_layer)
        self.out_features, self.in_features = W.shape
        # The category is shared by several layers: hold it without registering it as a child.
        object.__setattr__(self, "category", category)
        self.mode = mode
        sigma = sigma.detach().float().to(W.device)
        self.register_buffer("frod_sigma", sigma.clone())
        # U_i^T (n x m) when it cannot be (or was asked not to be) recomputed from W_i.
        self.register_buffer("frod_U_t", None if U_t is None else U_t.detach().float().contiguous().to(W.device))
        self.frod_lambda = nn.Parameter(sigma.clone())  # lambda_i starts at sigma_i
        self.frod_s = nn.Parameter(torch.zeros(category.k, dtype=torch.float32, device=W.device))
        self.disabled = False
        self.merged = False
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._cache = None

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

    # ---- one build per accumulation window (used by accumulate.py) ------------------------------
    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_i + dW_i in the base layer's own layout and dtype (n x m for Conv1D), without a graph: the
        matrix the materialized forward multiplies by, bit for bit (`_linear` forms the same sum)."""
        base = self.base_layer
        dW = self.delta_weight().to(weight_of(base).dtype)
        return base.weight + (dW.T if is_conv1d(base) else dW)

    def backward_delta_weight(self, G: torch.Tensor) -> None:
        """Add dL/dlambda_i and dL/ds_i to their .grad, given G = dL/d(dW_i) (m x n, any float dtype).

        dW_i = (U_i M_i) V^T, so dL/d(U_i M_i) = G V; autograd carries it through (U_i M_i)^T = M_i^T U_i^T
        to the diagonal (lambda_i) and the pattern entries (s_i): dL/dM_i = U_i^T G V, the same products the
        per-micro-batch backward runs. M_i enters dW_i linearly, so G may be a sum over micro-batches."""
        with torch.enable_grad():
            CT = self.um_t()
            torch.autograd.backward(CT, (G.float() @ self.category.V).T)

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
    def _step_costs(self, tokens: int):
        """(materialize, project) multiply-adds of one training call with `tokens` tokens (choose_mode's rule)."""
        m, n, T = self.out_features, self.in_features, tokens
        u_stored = self.frod_U_t is not None
        mat = (1 if u_stored else 2) * m * n * n + m * n * n + T * m * n
        proj = (2 * T * n * n + 2 * T * m * n) if u_stored else 4 * T * n * n
        return mat, proj

    def choose_mode(self, tokens: int, training: bool) -> str:
        """Pick the cheaper evaluation order for this call, counting multiply-adds beyond the base GEMMs.

        materialize: building dW costs m n^2 (plus m n^2 to recompute U when it is not stored); training
        adds the weight gradient of W + dW (T m n) and its projection onto the basis (m n^2).
        project (U recomputed): V^T x and V^-T t forward and backward, 4 T n^2 (2 T n^2 without grad).
        project (U stored): 2 T n^2 + 2 T m n.
        Without gradients the materialized dW is cached across calls, so evaluation always materializes."""
        if self.mode != "auto":
            return self.mode
        if not training:
            return "materialize"
        mat, proj = self._step_costs(tokens)
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
        """The base layer's own op with W + dW, so that dW == 0 reproduces it bit for bit."""
        base = self.base_layer
        return self._with_weight(x, base.weight + (dW.T if is_conv1d(base) else dW))

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's own op with `weight` (in the base layer's layout) in place of its weight."""
        base = self.base_layer
        if is_conv1d(base):
            y = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), weight)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, base.bias)

    def drop_cache(self) -> None:
        """Forget the dW kept for no-grad calls (an m x n tensor); the next such call rebuilds it."""
        self._cache = None

    def _cached_delta(self) -> torch.Tensor:
        W = weight_of(self.base_layer)
        key = (self.frod_lambda._version, self.frod_s._version, W._version, W.data_ptr(), W.device, W.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.delta_weight().to(W.dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        training = torch.is_grad_enabled() and (self.frod_lambda.requires_grad or self.frod_s.requires_grad)
        tokens = x.numel() // self.in_features
        if self._window is not None:
            # inside accumulate(): W + dW of the window when this layer takes part (None: it keeps its own order)
            W_eff = self._window.weight(self, tokens, training)
            if W_eff is not None:
                return self._with_weight(x, W_eff)
        W = weight_of(self.base_layer)
        if self.choose_mode(tokens, training) == "materialize":
            dW = self.delta_weight().to(W.dtype) if training else self._cached_delta()
            return self._linear(x, dW)
        self.drop_cache()
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
        self.base_layer.weight.copy_(self._unmerged_weight)  # exact: the pre-merge weight was kept
        self._unmerged_weight = None
        self.merged = False
        self.drop_cache()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, category={self.category.key!r}, "
                f"k={self.category.k}, mode={self.mode}, U={'stored' if self.frod_U_t is not None else 'recomputed'}")
