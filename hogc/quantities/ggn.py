"""Generalized Gauss-Newton quantities: diagonals, blocks, the full matrix, its square root,
matrix-free products and the top of its spectrum."""
from __future__ import annotations

import math

from hogc.passes.push_forward import push_forward

from ..capture.losses import num_columns
from ..errors import HogcError
from ..ir import Index, Node, Op, Variance, build as B
from .builder import DerivativeBuilder, square_sum, sum_parts
from .registry import MAX_ELEMENTS, register_quantity


def ggn_diagonals(b: DerivativeBuilder, per_sample: bool) -> dict[str, Node]:
    """GGN diagonals per parameter, summed over samples or per sample (shared with hessian_diag)."""
    keep = B.letters(2)[1] if per_sample else ""
    return sum_parts([{k: square_sum(v, keep, 2, metric=False) for k, v in part.items()}
                      for part in b.sqrt_ggn_parts(False)])


@register_quantity("ggn_diag")
def _ggn_diag(b):
    """Diagonal of the generalized Gauss-Newton matrix J^T (d2L/df2) J (exact square root)."""
    return ggn_diagonals(b, per_sample=False)


@register_quantity("batch_ggn_diag", per_sample=True)
def _batch_ggn_diag(b):
    """Per-sample GGN diagonals (they sum to ggn_diag)."""
    return ggn_diagonals(b, per_sample=True)


@register_quantity("ggn_diag_mc")
def _ggn_diag_mc(b):
    """Monte-Carlo GGN diagonal (Fisher with sampled targets), mc_samples columns."""
    return sum_parts([{k: square_sum(v, "", 2, metric=False) for k, v in part.items()}
                      for part in b.sqrt_ggn_parts(True)])


# --- GGN blocks, full matrix, factor, products, spectrum ------------------------------------

def _guard(what: str, elements: int, result: str) -> None:
    if elements > MAX_ELEMENTS:
        raise HogcError(f"{result} of {what} has {elements} entries (more than {MAX_ELEMENTS}); use ggn_diag, "
                        f"kflr, ggnvp or ggn_eigen instead")


def _flat_columns(b: DerivativeBuilder) -> Node:
    """All parameters' square-root columns side by side: (C, N, D), parameters in model order."""
    flats = []
    for v in b.sqrt_ggn.values():
        P = math.prod(v.shape[2:])
        flats.append(B.reshape(v, v.shape[:2] + (P,)))
    return B.cat(flats, 2)


@register_quantity("sqrt_ggn", per_sample=True)
def _sqrt_ggn(b):
    """V with GGN = V V^T: per parameter (C, N, *param), BackPACK's SqrtGGNExact layout (C columns
    for cross-entropy too, where the summed quantities backpropagate only C - 1)."""
    return dict(b.sqrt_ggn_full)


@register_quantity("ggn_block")
def _ggn_block(b):
    """The exact (P x P) GGN block of each parameter (P = param.numel(), row-major)."""
    out = {}
    for k, v in b.sqrt_ggn.items():
        _guard(k, math.prod(v.shape[2:]) ** 2, "its GGN block")
        nd = v.ndim - 2
        L = B.letters(2 + 2 * nd)
        c, n, A, Bl = L[0], L[1], L[2:2 + nd], L[2 + nd:]
        block = B.einsum([c + n + A, c + n + Bl], A + Bl, [v, v])
        P = math.prod(v.shape[2:])
        out[k] = B.reshape(block, (P, P))
    return out


@register_quantity("ggn", per_param=False)
def _ggn(b):
    """The full (D x D) GGN over all trainable parameters, flattened and concatenated in
    ``named_parameters()`` order."""
    V = _flat_columns(b)
    _guard("the model", V.shape[2] ** 2, "the full GGN")
    return B.einsum(["cna", "cnb"], "ab", [V, V])


@register_quantity("ggnvp", takes_vector=True)
def _ggnvp(b):
    """GGN times the vector v (dict keyed like the parameters): sum_n J_n^T H_n J_n v, matrix-free.
    One forward-mode pass gives J v at the output, the loss Hessian's square root applies H = S S^T
    to it, and one reverse pass brings H J v back: no per-column backward passes."""
    s = Index("s", 1, "tangent", Variance.BATCH)
    tangents = {b.params[k].uid: B.reshape(v, (1,) + v.shape, (s,) + v.indices) for k, v in b.vector.items()}
    Jv = push_forward({"o": b.output}, tangents)["o"]  # (s, n, ...) at the model output
    out_l = B.letters(b.output.ndim, 2)
    S = b.column_seed(mc=False)
    if Jv is None:
        seed = B.scale(B.einsum(["a" + out_l], out_l, [S]), 0.0)
    else:
        u = B.einsum(["a" + out_l, "b" + out_l], "a" + out_l[0], [S, Jv])  # (c, n): S^T J v
        seed = B.einsum(["a" + out_l, "a" + out_l[0]], out_l, [S, u])  # S S^T J v, a cotangent of the output
    return {k: B.einsum([B.letters(p.ndim)], B.letters(p.ndim - 1, 1), [p]) for k, p in b._backprop(seed, ()).items()}


@register_quantity("ggn_eigen", per_param=False)
def _ggn_eigen(b):
    """The ``top_k`` largest GGN eigenvalues, from the (CN x CN) Gram matrix V^T V (ViViT)."""
    gram = None
    for v in b.sqrt_ggn.values():  # one Gram term per parameter, so fusion can factor each one
        L = B.letters(v.ndim + 2)
        c, n, d, m, A = L[0], L[1], L[2], L[3], L[4:]
        g = B.einsum([c + n + A, d + m + A], c + n + d + m, [v, v], metric=A)  # Euclidean inner product
        gram = g if gram is None else B.add(gram, g)
    C, N = gram.shape[:2]
    gram = B.reshape(gram, (C * N, C * N))
    D = sum(math.prod(v.shape[2:]) for v in b.sqrt_ggn.values())
    k = min(b.top_k, C * N, D)  # the GGN has rank <= min(CN, D); the Gram matrix's other eigenvalues are 0
    top = Node(Op.EIGVALSH, (gram,), k, (Index("k", k, "eigen", Variance.BATCH),))
    # cross-entropy's C - 1 columns: the eigenvalues past the Gram matrix's size are exact zeros
    # (the GGN is positive semi-definite), as with BackPACK's C columns
    kk = min(b.top_k, D, num_columns(b.spec, b.output.shape, full=True) * N)
    return top if kk == k else B.pad(top, 0, 0, 1, kk, Index("k", kk, "eigen", Variance.BATCH))
