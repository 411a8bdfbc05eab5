"""Partition-level derivatives (Wolinski, arXiv 2312.03885): the parameters split into S subsets,
a direction u (default: the gradient), and the derivatives of eta -> L(theta + U eta) at 0, where
column s of U is u restricted to subset s:

* ``partition_grad`` (S,): g_s = u_s^T g
* ``partition_hessian`` (S, S): H_st = u_s^T H u_t, forward-over-reverse with the S restricted
  directions travelling together as one tangent index.

* ``partition_d3`` (S, S, S): D_stv = D^3 L[u_s, u_t, u_v], forward-over-forward-over-reverse:
  the Hessian-vector program of the S directions is pushed forward again along the S
  directions (a second tangent index), the direction held constant.
"""
from __future__ import annotations

import torch

from ..errors import HogcError
from ..ir import Index, Node, Variance, build as B
from .builder import DerivativeBuilder
from hogc.passes.push_forward import push_forward

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


def _restricted(b: DerivativeBuilder, u: dict[str, Node], index: Index) -> dict[str, Node]:
    """The S directions as one tangent per parameter: (S, *param), u_k in the row of k's subset."""
    out = {}
    for j, subset in enumerate(_subsets(b)):
        for k in subset:
            L = B.letters(u[k].ndim + 1)
            out[k] = B.einsum([L[0], L[1:]], L, [_onehot(b, j, index), u[k]])
    return out


def _apply_directions(b: DerivativeBuilder, u: dict[str, Node], per_param: dict[str, Node | None],
                      lead: tuple[Index, ...], t: Index) -> Node:
    """sum_k onehot_t(subset of k) <u_k, per_param_k>: per_param_k has indices (*lead, *param);
    the result (*lead[::-1] in (s, [v]) order, t) is arranged as (s, t[, v])."""
    order = (lead[-1], t) + tuple(reversed(lead[:-1]))  # (s, t) or (s, t, v) from lead (s,) or (v, s)
    total = None
    for j, subset in enumerate(_subsets(b)):
        for k in subset:
            if per_param.get(k) is None:
                continue
            L = B.letters(len(lead) + 1 + u[k].ndim)
            ld, tt, P = L[:len(lead)], L[len(lead)], L[len(lead) + 1:]
            out = ld[-1] + tt + ld[:-1][::-1]
            term = B.einsum([ld + P, P, tt], out, [per_param[k], u[k], _onehot(b, j, t)], out_indices=order)
            total = term if total is None else B.add(total, term)
    if total is None:  # the loss does not depend on the covered parameters
        total = B.const_tensor(torch.zeros(tuple(i.size for i in order), dtype=b.dtype), order)
    return total


@register_quantity("partition_hessian", per_param=False)
def _partition_hessian(b):
    """(S, S): u_s^T H u_t, exact (residual terms included), symmetric."""
    u = _direction(b)
    s, t = _subset_index(b, "s"), _subset_index(b, "t")
    hu = _tangent_grads(b, _restricted(b, u, s))  # per parameter (s, *param): (H U)_k, lower
    return _apply_directions(b, u, hu, (s,), t)


@register_quantity("partition_d3", per_param=False)
def _partition_d3(b):
    """(S, S, S): D^3 L[u_s, u_t, u_v], exact, symmetric in all index permutations."""
    u = _direction(b)
    s, t, v = _subset_index(b, "s"), _subset_index(b, "t"), _subset_index(b, "v")
    first = _restricted(b, u, s)
    hu = {k: h for k, h in _tangent_grads(b, first).items() if h is not None}
    seeds: dict[int, Node | None] = {b.params[k].uid: x for k, x in _restricted(b, u, v).items()}
    # the direction is a constant of the expansion: neither u nor the first tangents move with theta
    seeds.update({x.uid: None for x in list(u.values()) + list(first.values())})
    d2 = push_forward(hu, seeds)  # per parameter (v, s, *param)
    return _apply_directions(b, u, d2, (v, s), t)
