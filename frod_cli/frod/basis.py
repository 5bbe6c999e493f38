"""The shared basis of one category: the regularized HO-GSVD through a QR (FROD_METHOD.md section 2),
and the seeded sparse pattern of S (section 3).

Notation as in the paper: layer i has weight W_i (m_i x n, torch layout), the category stacks them
into A (M x n), and every member is written W_i = U_i diag(sigma_i) V^T with one V shared by all.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

# A category whose V is too ill-conditioned to recompute U_i = W_i V^-T diag(1/sigma_i) in float32
# to this relative accuracy keeps U_i as buffers instead (rank-deficient and wide stacks end up here).
RECOMPUTE_TOL = 2e-6


@dataclass
class CategoryBasis:
    V: torch.Tensor  # n x n, shared; invertible unless the stack is rank-deficient or wide
    V_inv_T: Optional[torch.Tensor]  # n x n, V^-T = R^-1 Z; None when V is singular
    sigma: List[torch.Tensor]  # per layer, length n: column norms of B_i = Q_i Z
    U: Optional[List[torch.Tensor]]  # per layer U_i = B_i / sigma_i, kept only when it cannot be recomputed
    rank_deficient: bool


def stack_qr(weights: Sequence[torch.Tensor]):
    """Step 1-2: A = [W_1; ...; W_N] = Q R (thin), Q split into row blocks Q_i (m_i x n).

    A wide stack (M < n: e.g. a single down-projection) is padded with zero rows so Q_i stays m_i x n and
    R is n x n; the padded directions get sigma = 0 (they are outside every W_i's row space)."""
    A = torch.cat(list(weights), dim=0)
    M, n = A.shape
    if M < n:
        A = torch.cat([A, A.new_zeros(n - M, n)], dim=0)
    Q, R = _cholesky_qr2(A) if M >= n else (None, None)
    if Q is None:
        Q, R = torch.linalg.qr(A, mode="reduced")
    blocks, start = [], 0
    for W in weights:
        blocks.append(Q[start : start + W.shape[0]])
        start += W.shape[0]
    return blocks, R


def gram(A: torch.Tensor, block: int = 512) -> torch.Tensor:
    """A^T A, computing only its lower block triangle (about (1 + block/n)/2 of the GEMM's work; torch has
    no syrk) and mirroring it. Small matrices take the plain GEMM."""
    n = A.shape[1]
    if n <= 2 * block:
        G = A.T @ A
        return (G + G.T) / 2
    G = A.new_empty(n, n)
    for j in range(0, n, block):
        e = min(j + block, n)
        G[j:, j:e] = A[:, j:].T @ A[:, j:e]  # block column j of the lower triangle, one GEMM
        G[j:e, e:] = G[e:, j:e].T
    return G


def _cholesky_qr2(A: torch.Tensor):
    """Thin QR as two rounds of Cholesky QR: GEMMs and triangular solves, several times faster than
    Householder on a CPU, and orthogonal to working precision for any cond(A) below ~1/sqrt(eps) (the
    second round repairs the first). Returns (None, None) when the Gram matrix is not positive definite
    (a rank-deficient or badly conditioned stack), so the caller falls back to Householder."""
    R = None
    Q = A
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(gram(Q))
        if int(info) != 0 or not torch.isfinite(L).all():
            return None, None
        Rk = L.T
        Q = torch.linalg.solve_triangular(Rk, Q, upper=True, left=False)
        R = Rk if R is None else Rk @ R
    d = R.diagonal().abs()
    if d.min() <= d.max() * 1e3 * torch.finfo(A.dtype).eps:
        return None, None
    return Q, R


def hogsvd_matrix(blocks: Sequence[torch.Tensor], pi: float) -> torch.Tensor:
    """Step 3: T = (1/N) sum_i (Q_i^T Q_i + pi I)^-1, without an n x n inverse per layer.

    For m_i < n the Gram block has rank <= m_i, so Woodbury turns the n x n inverse into an m_i x m_i
    Cholesky:  (pi I + Q_i^T Q_i)^-1 = (I - Y_i^T Y_i) / pi  with  Y_i = L_i^-1 Q_i,  L_i L_i^T = pi I + Q_i Q_i^T.
    Equal-shaped blocks are batched, and sum_i Y_i^T Y_i is one GEMM over the stacked Y."""
    n = blocks[0].shape[1]
    N = len(blocks)
    eye = torch.eye(n, dtype=blocks[0].dtype, device=blocks[0].device)
    total = torch.zeros_like(eye)
    wide = [Q for Q in blocks if Q.shape[0] < n]
    tall = [Q for Q in blocks if Q.shape[0] >= n]
    by_rows: dict = {}
    for Q in wide:
        by_rows.setdefault(Q.shape[0], []).append(Q)
    for m, group in by_rows.items():
        Qs = torch.stack(group)  # g x m x n
        K = Qs @ Qs.transpose(1, 2)
        K.diagonal(dim1=1, dim2=2).add_(pi)
        L = torch.linalg.cholesky(K)
        Y = torch.linalg.solve_triangular(L, Qs, upper=False).reshape(-1, n)
        total += (len(group) * eye - gram(Y)) / pi
    if tall:
        # m_i >= n: the n x n Gram blocks are full rank; one batched Cholesky inverse for all of them
        G = torch.stack([Q.T @ Q for Q in tall])
        G.diagonal(dim1=1, dim2=2).add_(pi)
        total += torch.cholesky_inverse(torch.linalg.cholesky(G)).sum(0)
    T = total / N
    return (T + T.T) / 2


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 GEMMs in full precision: TF32 (a 10-bit mantissa, which a user may have switched on with
    torch.set_float32_matmul_precision) would break the QR's orthogonality and the RECOMPUTE_TOL check."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def decomposition_cost(shapes: Sequence[Sequence[int]]) -> float:
    """Multiply-adds of `shared_basis` on a stack of W_i shaped (m_i, n), up to a constant: the QR and
    B = Q Z (about 3 M n^2 for the stack of M rows), the HO-GSVD matrix (a Gram block and an n x n
    Cholesky inverse per tall layer, a Woodbury solve per wide one) and the eigh, V and V^-T (about
    12 n^3). Only the ratios between categories matter: the ranks split the categories by it."""
    n = int(shapes[0][1])
    M = sum(int(m) for m, _ in shapes)
    per_layer = sum(m * n * n + (n ** 3 if m >= n else 2 * m * m * n) for m, _ in shapes)
    return float(3 * M * n * n + per_layer + 12 * n ** 3)


def shared_basis(weights: Sequence[torch.Tensor], regularization: float, dtype: torch.dtype,
                 device: Optional[torch.device] = None) -> CategoryBasis:
    """Steps 1-5 for one category. `weights` are the members' W_i (m_i x n) in layer order; they are
    copied to `device` (default: where they are) in `dtype`, and the factors are computed there."""
    with ieee_float32():
        return _decompose([w.detach().to(device=device or w.device, dtype=dtype) for w in weights], regularization)


def _decompose(W: List[torch.Tensor], regularization: float) -> CategoryBasis:
    blocks, R = stack_qr(W)
    T = hogsvd_matrix(blocks, regularization)
    _, Z = torch.linalg.eigh(T)  # step 3: Z diagonalizes T (orthogonal)
    V = R.T @ Z  # step 4: carries the weights' scale; not orthogonal
    sigma, B_list = [], []
    B_all = torch.cat(blocks, dim=0) @ Z  # step 5: B_i = Q_i Z = W_i V^-T, no inverse needed
    start = 0
    for w in W:
        B = B_all[start : start + w.shape[0]]
        start += w.shape[0]
        B_list.append(B)
        sigma.append(torch.linalg.vector_norm(B, dim=0))
    # V^-T = R^-1 Z lets a layer rebuild U_i from its own weight instead of storing it; check, on a
    # sample of rows, that float32 recomputation reproduces B_i closely enough to rely on it.
    V_inv_T = None
    rank_deficient = _needs_stored_u(R)
    if not rank_deficient:
        V_inv_T = torch.linalg.solve_triangular(R, Z, upper=True)
        V_inv_T32 = V_inv_T.float()
        for w, B in zip(W, B_list):
            rows = torch.linspace(0, w.shape[0] - 1, min(64, w.shape[0]), device=w.device).long()
            approx = w[rows].float() @ V_inv_T32
            err = torch.linalg.norm(approx - B[rows].float()) / torch.linalg.norm(B[rows].float()).clamp_min(1e-30)
            if not torch.isfinite(err) or err > RECOMPUTE_TOL:
                rank_deficient = True
                V_inv_T = None
                break
    U = None
    if rank_deficient:
        # sigma_ik = 0 (a zero layer, a duplicated direction, the padding of a wide stack): u_k is set to 0;
        # those directions cannot change the layer and are reported as inert.
        U = [B / torch.where(s > 0, s, torch.ones_like(s)) for B, s in zip(B_list, sigma)]
    return CategoryBasis(V=V, V_inv_T=V_inv_T, sigma=sigma, U=U, rank_deficient=rank_deficient)


def _needs_stored_u(R: torch.Tensor) -> bool:
    d = R.diagonal().abs()
    return bool(d.min() <= d.max() * torch.finfo(torch.float32).eps * R.shape[0])


def pattern_seed(seed: int, category_key: str) -> int:
    """A per-category seed: patterns do not depend on which other categories exist or their order."""
    digest = hashlib.sha256(f"frod-pattern:{seed}:{category_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sparse_pattern(n: int, sparse_rate: float, seed: int, category_key: str):
    """k = floor(sparse_rate * n^2) off-diagonal positions of S, uniform without replacement.

    Returns (rows, cols) as int64, sorted by row-major position. Drawn on the CPU from a seeded generator
    so every machine and every rank gets the same pattern."""
    k = int(sparse_rate * n * n)
    off = n * (n - 1)
    if k > off:
        from .config import FrodError

        raise FrodError(f"sparse_rate {sparse_rate} asks for {k} off-diagonal entries of a {n} x {n} S; at most {off} exist")
    g = torch.Generator(device="cpu").manual_seed(pattern_seed(seed, category_key))
    if k == 0:
        idx = torch.empty(0, dtype=torch.long)
    elif off <= 50_000_000:
        idx = torch.randperm(off, generator=g)[:k]
    else:
        # Large n: draw with replacement until k distinct, then keep a uniform k-subset of the distinct ones.
        idx = torch.empty(0, dtype=torch.long)
        while idx.numel() < k:
            extra = torch.randint(off, (int((k - idx.numel()) * 1.1) + 64,), generator=g)
            idx = torch.unique(torch.cat([idx, extra]))
        idx = idx[torch.randperm(idx.numel(), generator=g)[:k]]
    idx, _ = torch.sort(idx)
    rows = idx // (n - 1)
    cols = idx % (n - 1)
    cols = cols + (cols >= rows).long()  # skip the diagonal
    return rows, cols


# ---- the streamed decomposition: one layer at a time --------------------------------------------------------
# The same steps 1-5 without the stack A, Q or B in memory. A layer source (sources.py) gives the category's
# W_i one at a time: `shapes` ((m_i, n) in layer order), `layer(i)` and `blocks(i, rows)` (W_i's rows in order,
# at most `rows` at a time). Each pass below reads every layer once and keeps only n x n matrices from one layer
# to the next, so memory does not grow with the number of layers; the price is reading the layers four times.
#   pass 1        G = sum_i W_i^T W_i                       (= A^T A)            R_1 = chol(G)
#   pass 2        sum_i (W_i R_1^-1)^T (W_i R_1^-1)         (Cholesky QR2's second round)   R = R_2 R_1
#   pass 3        T = (1/N) sum_i (Q_i^T Q_i + pi I)^-1     with Q_i = W_i R^-1 formed and dropped per block
#   eigh          Z;  V = R^T Z,  V^-T = R^-1 Z
#   pass 4        B_i = W_i V^-T (= Q_i Z), sigma_i = its column norms; U_i only where it must be stored
# Sums over layers accumulate in ACCUMULATION (float64), so their rounding does not grow with the number of
# layers; each block's products run in the basis dtype, like the in-memory path.
ACCUMULATION = torch.float64


def block_rows(n: int) -> int:
    """Rows per block of a streamed layer: a block is at most about one n x n matrix (and never under 256 rows,
    which keeps the GEMMs efficient on small n)."""
    return max(256, int(n))


def streamed_blocks(source, i: int, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    for block in source.blocks(i, block_rows(source.shapes[0][1])):
        yield block.detach().to(device=device, dtype=dtype)


def gram_add_(G: torch.Tensor, A: torch.Tensor, block: int = 512) -> torch.Tensor:
    """G += A^T A on the lower block triangle only (as `gram`; `mirror_` fills the upper one). G may be float64
    while A is float32: each block's product runs in A's dtype and is added at G's precision."""
    n = A.shape[1]
    for j in range(0, n, block):
        e = min(j + block, n)
        G[j:, j:e] += A[:, j:].T @ A[:, j:e]
    return G


def mirror_(G: torch.Tensor, block: int = 512) -> torch.Tensor:
    n = G.shape[0]
    for j in range(0, n, block):
        e = min(j + block, n)
        G[j:e, e:] = G[e:, j:e].T
    return G


def stacked_gram(source, R: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One pass: sum_i (W_i R^-1)^T (W_i R^-1), or sum_i W_i^T W_i without R; n x n, in ACCUMULATION."""
    n = source.shapes[0][1]
    G = torch.zeros(n, n, dtype=ACCUMULATION, device=device)
    for i in range(len(source.shapes)):
        for W in streamed_blocks(source, i, dtype, device):
            gram_add_(G, W if R is None else torch.linalg.solve_triangular(R, W, upper=True, left=False))
    return mirror_(G)


def upper_cholesky(G: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """R (upper triangular, G's dtype) with R^T R = G, or None where G is not positive definite at `dtype`'s
    precision (the diagonal test of `_cholesky_qr2`)."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0 or not torch.isfinite(L).all():
        return None
    d = L.diagonal()
    if d.min() <= d.max() * 1e3 * torch.finfo(dtype).eps:
        return None
    return L.T


def streamed_r(source, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, bool]:
    """R of the stacked QR A = Q R from Cholesky rounds, one pass over the layers each; (R in `dtype`, whether
    Q = A R^-1 is orthonormal to working precision).

    A Gram matrix that is not positive definite (a rank-deficient or badly conditioned stack) takes a shifted
    first round, chol(G + s I) (shifted Cholesky QR, Fukaya et al. 2020, which needs no Householder step and so
    streams), then two plain rounds. Where a later round fails too the stack is numerically rank deficient:
    R stays the shifted one, Q_i = W_i R^-1 is not orthonormal, W_i = Q_i R still holds exactly, and the caller
    stores U_i as the in-memory path does for such stacks."""
    G = stacked_gram(source, None, dtype, device)
    R = upper_cholesky(G, dtype)
    rounds = 1
    if R is None:
        top = float(G.diagonal().max())
        G.diagonal().add_(10 * G.shape[0] * torch.finfo(dtype).eps * top if top > 0 else 1.0)
        R, rounds = torch.linalg.cholesky(G).T, 2
    del G
    R = R.to(dtype)
    for _ in range(rounds):
        Rk = upper_cholesky(stacked_gram(source, R, dtype, device), dtype)
        if Rk is None:
            return R, False
        R = (Rk.double() @ R.double()).to(dtype)
    return R, True


def streamed_hogsvd_matrix(source, R: torch.Tensor, pi: float, dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
    """Pass 3: T = (1/N) sum_i (Q_i^T Q_i + pi I)^-1 with Q_i = W_i R^-1, as `hogsvd_matrix` does per layer: an
    n x n Cholesky inverse of a tall layer's Gram block (accumulated over its row blocks), Woodbury for a wide
    one (m_i < n: the layer is one block, smaller than an n x n matrix)."""
    n, N = source.shapes[0][1], len(source.shapes)
    T = torch.zeros(n, n, dtype=ACCUMULATION, device=device)
    for i, (m, _) in enumerate(source.shapes):
        Qs = (torch.linalg.solve_triangular(R, W, upper=True, left=False)
              for W in streamed_blocks(source, i, dtype, device))
        if m < n:
            Q = torch.cat(list(Qs))
            K = Q @ Q.T
            K.diagonal().add_(pi)
            Y = torch.linalg.solve_triangular(torch.linalg.cholesky(K), Q, upper=False)
            T.diagonal().add_(1.0 / pi)
            T.sub_(gram(Y), alpha=1.0 / pi)
            continue
        Gi = torch.zeros(n, n, dtype=dtype, device=device)
        for Q in Qs:
            gram_add_(Gi, Q)
        mirror_(Gi).diagonal().add_(pi)
        T += torch.cholesky_inverse(torch.linalg.cholesky(Gi))
    T /= N
    return ((T + T.T) / 2).to(dtype)


def sample_rows(m: int, device: torch.device) -> torch.Tensor:
    """The rows of a layer on which the recompute check runs (64 spread over the layer, as `_decompose`)."""
    return torch.linspace(0, m - 1, min(64, m), device=device).long()


def streamed_sigma(source, R: torch.Tensor, Z: torch.Tensor, V_inv_T: torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> Optional[List[torch.Tensor]]:
    """Pass 4: sigma_i = column norms of B_i = W_i V^-T, block by block; None when, on a layer's sample rows,
    recomputing U_i in float32 (W_i V^-T, what FrodLinear does) misses B_i = (W_i R^-1) Z by more than
    RECOMPUTE_TOL: the category then keeps U_i (`streamed_u`)."""
    V_inv_T32 = V_inv_T.float()
    sigma = []
    for i, (m, _) in enumerate(source.shapes):
        rows, start = sample_rows(m, device), 0
        squares = torch.zeros(V_inv_T.shape[1], dtype=torch.float64, device=device)
        miss = torch.zeros((), dtype=torch.float64, device=device)
        norm = torch.zeros((), dtype=torch.float64, device=device)
        for W in streamed_blocks(source, i, dtype, device):
            squares += torch.linalg.vector_norm(W @ V_inv_T, dim=0).double() ** 2
            here = rows[(rows >= start) & (rows < start + W.shape[0])] - start
            start += W.shape[0]
            if here.numel():
                exact = (torch.linalg.solve_triangular(R, W[here], upper=True, left=False) @ Z).float()
                miss += torch.linalg.norm(W[here].float() @ V_inv_T32 - exact).double() ** 2
                norm += torch.linalg.norm(exact).double() ** 2
        err = miss.sqrt() / norm.sqrt().clamp_min(1e-30)
        if not torch.isfinite(err) or err > RECOMPUTE_TOL:
            return None
        sigma.append(squares.sqrt().to(dtype))
    return sigma


def streamed_u(source, R: torch.Tensor, Z: torch.Tensor, dtype: torch.dtype,
               device: torch.device) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Pass 4 where U_i is stored: B_i = (W_i R^-1) Z (the Q path, as `_decompose`), sigma_i and U_i = B_i / sigma_i
    (u_k = 0 where sigma_ik = 0). The U_i are the output, M x n in all, as in memory."""
    sigma, U = [], []
    for i in range(len(source.shapes)):
        B = torch.cat([torch.linalg.solve_triangular(R, W, upper=True, left=False) @ Z
                       for W in streamed_blocks(source, i, dtype, device)])
        s = torch.linalg.vector_norm(B, dim=0)
        sigma.append(s)
        U.append(B / torch.where(s > 0, s, torch.ones_like(s)))
    return sigma, U


def streamed_basis(source, regularization: float, dtype: torch.dtype,
                   device: Optional[torch.device] = None) -> CategoryBasis:
    """Steps 1-5 for one category from a layer source, one layer (block) at a time on `device` (default: the
    source's device): memory a few n x n matrices plus one block, whatever the number of layers. The factors
    equal `shared_basis`'s up to rounding (docs/PERFORMANCE.md gives how far on real weights). A wide stack
    (M < n rows in all) is smaller than one n x n matrix: it is gathered and decomposed as in memory."""
    device = torch.device(device) if device is not None else source.device
    n, M = int(source.shapes[0][1]), sum(int(m) for m, _ in source.shapes)
    with ieee_float32():
        if M < n:
            layers = [source.layer(i).detach().to(device=device, dtype=dtype) for i in range(len(source.shapes))]
            return _decompose(layers, regularization)
        R, orthonormal = streamed_r(source, dtype, device)
        _, Z = torch.linalg.eigh(streamed_hogsvd_matrix(source, R, regularization, dtype, device))
        V = R.T @ Z
        sigma = None
        if orthonormal and not _needs_stored_u(R):
            V_inv_T = torch.linalg.solve_triangular(R, Z, upper=True)
            sigma = streamed_sigma(source, R, Z, V_inv_T, dtype, device)
        if sigma is None:
            sigma, U = streamed_u(source, R, Z, dtype, device)
            return CategoryBasis(V=V, V_inv_T=None, sigma=sigma, U=U, rank_deficient=True)
        return CategoryBasis(V=V, V_inv_T=V_inv_T, sigma=sigma, U=None, rank_deficient=False)
