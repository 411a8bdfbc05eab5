"""Partition-level derivatives (Wolinski, arXiv 2312.03885): the parameters split into S subsets,
a direction u (default: the gradient), and the derivatives of eta -> L(theta + U eta) at 0, where
column s of U is u restricted to subset s:

* ``partition_grad`` (S,): g_s = u_s^T g
* ``partition_hessian`` (S, S): H_st = u_s^T H u_t, forward-over-reverse with the S restricted
  directions travelling together as one tangent index.

The third-order tensor ``partition_d3`` (Taylor mode) is not built yet.
"""
from __future__ import annotations

import torch

from ..errors import HogcError
from ..ir import Index, Node, Variance, build as B
from .builder import DerivativeBuilder
from .hessian import TANGENT, _sum_samples_first, _tangent_grads
from .registry import register_quantity

def _subsets(b: DerivativeBuilder) -> list[list[str]]:
    if not b.partition:
        raise HogcError("partition quantities need partition= (a list of lists of parameter names, "
                        "'module' or 'parameter')")
    return b.partition


def _direction(b: DerivativeBuilder) -> dict[str, Node]:
    """u per covered parameter, upper indices: the given direction, or the gradient raised through
    the Euclidean metric (an explicit, basis-dependent identification)."""
    names = [k for s in _subsets(b) for k in s]
    if b.direction_given:
        return {k: B.inp("direction", k, b.params[k].indices) for k in names}
    out = {}
    for k in names:
        g = _sum_samples_first(b.per_sample_grads[k])
        L = B.letters(g.ndim)
        out[k] = B.einsum([L], L, [g], metric=L, out_indices=b.params[k].indices)
    return out


def _onehot(b: DerivativeBuilder, j: int, index: Index) -> Node:
    e = torch.zeros(index.size, dtype=b.dtype)
    e[j] = 1.0
    return B.const_tensor(e, (index,))


def _subset_index(b: DerivativeBuilder, name: str) -> Index:
    return Index(name, len(_subsets(b)), TANGENT, Variance.BATCH)


@register_quantity("partition_grad", per_param=False)
def _partition_grad(b):
    """(S,): u_s^T g for each subset s of the partition (u: direction=, default the gradient)."""
    u = _direction(b)
    s = _subset_index(b, "s")
    total = None
    for j, subset in enumerate(_subsets(b)):
        for k in subset:
            g = _sum_samples_first(b.per_sample_grads[k])
            L = B.letters(g.ndim + 1)
            t = B.einsum([L[0], L[1:], L[1:]], L[0], [_onehot(b, j, s), u[k], g])
            total = t if total is None else B.add(total, t)
    return total


@register_quantity("partition_hessian", per_param=False)
def _partition_hessian(b):
    """(S, S): u_s^T H u_t, exact (residual terms included), symmetric."""
    u = _direction(b)
    s, t = _subset_index(b, "s"), _subset_index(b, "t")
    st = s
    tangents = {}
    for j, subset in enumerate(_subsets(b)):
        for k in subset:
            L = B.letters(u[k].ndim + 1)
            tangents[k] = B.einsum([L[0], L[1:]], L, [_onehot(b, j, st), u[k]])
    hu = _tangent_grads(b, tangents)  # per parameter (s, *param): (H U)_k, lower
    total = None
    for j, subset in enumerate(_subsets(b)):
        for k in subset:
            if hu.get(k) is None:
                continue
            L = B.letters(u[k].ndim + 2)
            term = B.einsum([L[0] + L[2:], L[2:], L[1]], L[:2], [hu[k], u[k], _onehot(b, j, t)],
                            out_indices=(s, t))
            total = term if total is None else B.add(total, term)
    if total is None:  # the loss does not depend on the covered parameters
        total = B.const_tensor(torch.zeros(s.size, t.size, dtype=b.dtype), (s, t))
    return total
