"""A frod FRoD adapter rewritten as PEFT's FRoD adapter (peft.FrodConfig, peft >= 0.20).

Both write a target layer as W_i' = U_i (diag(lambda_i) + S_i) V^T, one V per category, lambda_i starting at
sigma_i, entry (r, c) of S adding s_rc u_r v_c^T. PEFT saves lambda, the S values, V and the pattern, but at load
it recomputes its own V from the base weights and derives U_i = W_i V^-T diag(1/sigma_i) from that V *before* it
reads the saved V. So the adapter must be written in PEFT's basis, not in ours.

Let R = V_ours^-1 V_peft. Where PEFT's decomposition is ours up to rounding, R is a signed, scaled permutation:
v_peft,a = d_a v_ours,pi(a) (eigh orders and signs eigenvectors freely; our QR's R has a positive diagonal,
LAPACK's may not). Then, with sigma_peft,a = sigma_ours,pi(a) / |d_a| and u_peft,a = sign(d_a) u_ours,pi(a):

    lambda_peft,a       = sigma_peft,a + (lambda_ours,pi(a) - sigma_ours,pi(a)) / |d_a|
    S_peft[a, b]        = sign(d_a) / d_b * S_ours[pi(a), pi(b)]      (the pattern moves with pi)

which is the same W_i' exactly. The base part diag(sigma) is PEFT's own, so at lambda = sigma PEFT gives back W_i.
What this cannot carry is the rest of R: where eigenvalues of the HO-GSVD matrix T nearly coincide, each
implementation's rounding picks its own mix of the near-equal directions ("mixing" below: the largest column of R
outside its dominant entry, relative to it), and the part of the update in those directions comes back wrong by
about mixing x |dW|. Where they coincide exactly (one layer in a category, or a square stack of two: T = c I)
PEFT's V is an arbitrary rotation of ours and the adapter cannot be expressed; the export refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from frod_cli import FrodCliError

ADAPTER = "default"


@dataclass
class Alignment:
    """PEFT's basis of one category against ours: v_peft,a = scale[a] * v_ours,perm[a], up to `mixing`."""

    key: str  # our category key
    peft_category: str
    perm: torch.Tensor  # pi, long (n,)
    scale: torch.Tensor  # d, float64 (n,)
    mixing: float


def align(V_ours: torch.Tensor, V_ours_inv: torch.Tensor, V_peft: torch.Tensor, key: str, peft_category: str,
          first_layer: str) -> Alignment:
    """R = V_ours^-1 V_peft read as a signed, scaled permutation; refuses when it is not one."""
    R = V_ours_inv.double() @ V_peft.double().to(V_ours_inv.device)
    A = R.abs()
    dominant, perm = A.max(0)
    n = R.shape[0]
    rest = ((A ** 2).sum(0) - dominant ** 2).clamp(min=0).sqrt()
    mixing = float((rest / dominant.clamp(min=torch.finfo(torch.float64).tiny)).max())
    if torch.unique(perm).numel() != n or mixing >= 1.0:
        raise FrodCliError(
            f"layer {first_layer}: PEFT's own V for its category {peft_category!r} is not frod's up to sign and order "
            f"(mixing {mixing:.1e}): the category's HO-GSVD eigenvalues coincide (a single layer, or two layers "
            "stacking to a square matrix), so PEFT, which recomputes V at load, cannot rebuild this adapter; "
            "export format=lora or format=merged instead, or train without this layer")
    return Alignment(key, peft_category, perm.cpu(), R[perm, torch.arange(n, device=R.device)].cpu(), mixing)


def to_peft_values(lam: torch.Tensor, sigma: torch.Tensor, s: torch.Tensor, sigma_peft: torch.Tensor,
                   al: Alignment, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lambda_peft, S values in the moved pattern's order) for one layer (formulas in the module docstring)."""
    d = al.scale.to(torch.float64)
    delta = (lam.double().cpu() - sigma.double().cpu())[al.perm]
    lam_peft = sigma_peft.double().cpu() + delta / d.abs()
    inverse = torch.empty_like(al.perm)
    inverse[al.perm] = torch.arange(al.perm.numel())
    a, b = inverse[rows.long().cpu()], inverse[cols.long().cpu()]
    s_peft = s.double().cpu() * torch.sign(d[a]) / d[b]
    return lam_peft.float(), s_peft.float()


def moved_pattern(rows: torch.Tensor, cols: torch.Tensor, al: Alignment, nnz: int) -> torch.Tensor:
    """Our pattern in PEFT's order (2 x nnz, long); padded with unused off-diagonal positions (value 0) when PEFT's
    count, min(int(n^2 rate), n^2 - n) and at least 1, exceeds ours, floor(rate n^2)."""
    inverse = torch.empty_like(al.perm)
    inverse[al.perm] = torch.arange(al.perm.numel())
    a, b = inverse[rows.long().cpu()], inverse[cols.long().cpu()]
    k, n = a.numel(), al.perm.numel()
    if nnz < k:
        raise FrodCliError(f"category {al.key}: PEFT's sparse pattern holds {nnz} entries, frod's {k}; "
                           "it cannot carry this adapter")
    if nnz > k:
        used = set((a * n + b).tolist())
        free = [p for p in range(n * n) if p // n != p % n and p not in used][: nnz - k]
        extra = torch.tensor(free, dtype=torch.long)
        a, b = torch.cat([a, extra // n]), torch.cat([b, extra % n])
    return torch.stack([a, b]).long()


def rebuildable(shapes: List[Tuple[int, int]]) -> bool:
    """Whether PEFT can rebuild the basis of a category of layers of these (out, in) shapes: not where its HO-GSVD
    matrix T is c I and any rotation of V is a solution, one layer or two stacking to a square matrix. `align`
    stays the final word (near-equal eigenvalues can mix too); this is what is known before training."""
    return not (len(shapes) == 1 or (len(shapes) == 2 and sum(m for m, _ in shapes) == shapes[0][1]))


def unrebuildable(model: nn.Module, target_modules: Any = None) -> List[str]:
    """The categories PEFT cannot rebuild: of a FRoD model's layers, or (target_modules given) of the layers a
    FRoD run of these targets would adapt in `model` (no basis computed)."""
    from frod_cli.frod import FrodConfig, find_targets, frod_layers
    from frod_cli.frod.adapter import group_categories
    from frod_cli.frod.layer import weight_shape

    if target_modules is None:
        shapes: Dict[str, List[Tuple[int, int]]] = {}
        for _, layer in frod_layers(model):
            shapes.setdefault(layer.category.key, []).append((layer.out_features, layer.in_features))
    else:
        groups = group_categories(find_targets(model, FrodConfig(target_modules=target_modules)))
        shapes = {key: [tuple(weight_shape(m)) for _, m in members] for key, members in groups.items()}
    return sorted(key for key, s in shapes.items() if not rebuildable(s))


def peft_format_note(model: nn.Module) -> Optional[str]:
    """What a run should be told at its start about `frod export format=peft` of what it trains (None: nothing)."""
    cats = unrebuildable(model)
    if not cats:
        return None
    return (f"FRoD categories {', '.join(cats)} are a single layer or two layers stacking to a square matrix: "
            "PEFT recomputes such a basis differently at load, so `frod export format=peft` of this run will be "
            "refused for them (format=lora and format=merged export it; leave these layers out of "
            "method.target_modules to avoid that refusal)")


def peft_categories(peft_model: nn.Module, layer_names: List[str]) -> Dict[str, Tuple[str, List[str]]]:
    """layer -> (PEFT's category name, that category's layers), read off PEFT's own model: each wrapped layer
    holds its category's V buffers."""
    tuner = peft_model.base_model
    name_of = {id(bd): cat for cat, bd in tuner.frod_V.items()}
    members: Dict[str, List[str]] = {}
    layer_cat = {}
    for name in layer_names:
        cat = name_of[id(tuner.model.get_submodule(name).frod_V)]
        layer_cat[name] = cat
        members.setdefault(cat, []).append(name)
    return {name: (cat, members[cat]) for name, cat in layer_cat.items()}


def fill_peft_model(frod_model: nn.Module, peft_model: nn.Module,
                    heads: Dict[str, Dict[str, torch.Tensor]]) -> List[Alignment]:
    """Write the frod model's trained values into `peft_model` (a fresh PEFT FRoD model on the same base):
    lambda, S and the pattern in PEFT's basis, and the trained modules_to_save. Returns each category's alignment."""
    from frod_cli.frod import frod_layers

    layers = dict(frod_layers(frod_model))
    cats = peft_categories(peft_model, list(layers))
    tuner = peft_model.base_model
    alignments, done = [], set()
    for name, layer in layers.items():
        category, peft_cat = layer.category, cats[name][0]
        if id(category) in done:
            continue
        done.add(id(category))
        ours = sorted(n for n, l in layers.items() if l.category is category)
        if sorted(cats[name][1]) != ours:
            raise FrodCliError(f"layer {name}: PEFT groups it with {sorted(cats[name][1])} (category {peft_cat!r}), "
                               f"frod with {ours}; PEFT's basis cannot carry this adapter")
        if category.V_inv_T is None:
            raise FrodCliError(f"layer {name}: frod's V of category {category.key} is singular (a wide or "
                               "rank-deficient stack) and PEFT builds that category's V differently; export "
                               "format=lora or format=merged instead")
        al = align(category.V, category.V_inv_T.T, tuner.frod_V[peft_cat][ADAPTER], category.key, peft_cat, name)
        alignments.append(al)
        _write_category(tuner, peft_cat, al, [(n, layers[n]) for n in ours])
    for module, state in heads.items():
        wrapper = tuner.model.get_submodule(module)
        wrapper.modules_to_save[ADAPTER].load_state_dict(state)
    return alignments


def _write_category(tuner: nn.Module, peft_cat: str, al: Alignment, members: List[Tuple[str, nn.Module]]) -> None:
    cat = members[0][1].category
    indices = tuner.frod_s_indices[peft_cat]
    nnz = indices[ADAPTER].shape[1]
    indices[ADAPTER] = moved_pattern(cat.rows, cat.cols, al, nnz).to(indices[ADAPTER].device)
    with torch.no_grad():
        for name, layer in members:
            target = tuner.model.get_submodule(name)
            lam_p, sigma_p = target.frod_lambda_l[ADAPTER], target.frod_lambda_l[ADAPTER].detach().clone()
            lam, s = to_peft_values(layer.frod_lambda.detach(), layer.frod_sigma, layer.frod_s.detach(), sigma_p,
                                    al, cat.rows, cat.cols)
            lam_p.copy_(lam.to(lam_p.dtype))
            values = target.frod_lambda_s_values[ADAPTER]
            values.zero_()
            values[: s.numel()].copy_(s.to(values.dtype))


def weight_errors(frod_model: nn.Module, peft_model: nn.Module) -> Dict[str, float]:
    """Per layer max|W'_peft - W'_frod| / max|W'_frod|, the adapted weights as each model computes them."""
    from frod_cli.frod import frod_layers

    out = {}
    tuner = peft_model.base_model
    with torch.no_grad():
        for name, layer in frod_layers(frod_model):
            dW = layer.delta_weight().float()  # out x in, like PEFT's for nn.Linear
            dW_peft = tuner.model.get_submodule(name).get_delta_weight(ADAPTER).float().to(dW.device)
            W = layer.base_layer.weight.detach().float()
            if W.shape != dW.shape:  # GPT-2's Conv1D stores W as in x out, and so does PEFT's delta there
                W, dW_peft = W.T, dW_peft.T
            W_frod, W_peft = W + dW, W + dW_peft
            out[name] = float((W_peft - W_frod).abs().max() / W_frod.abs().max().clamp(min=1e-30))
    return out
