"""Partition-level derivatives (Wolinski, arXiv 2312.03885): the parameters split into S subsets,
a direction u (default: the gradient), and the derivatives of eta -> L(theta + U eta) at 0, where
column s of U is u restricted to subset s:

* ``partition_grad`` (S,): g_s = u_s^T g
* ``partition_hessian`` (S, S): H_st = u_s^T H u_t, forward-over-reverse.
* ``partition_d3`` (S, S, S): D_stv = D^3 L[u_s, u_t, u_v], forward-over-forward-over-reverse:
  the Hessian-vector program is pushed forward again along the directions, held constant.
* ``partition_d3_diag`` (S,): D_sss, what the order-3 optimizer uses.

Two strategies build them (``partition_strategy=``):

* ``dense``: the S restricted directions travel together as one tangent index (a second one for
  D): S x S tangent pairs through every layer, in few large kernels (GPUs).
* ``unrolled``: one push per subset s and per unordered pair (s, t), each asked only for the
  subsets ranked at or after it (symmetry: every unordered pair and triple once), so a push
  never enters the layers before its subset, where the restricted direction is zero
  (structural zeros). About S^3/6 instead of S^3 layer-pairs on a chain (CPUs).
"""
from __future__ import annotations

import itertools

import torch

from hogc.passes.paths import einsum_flops
from hogc.passes.push_forward import push_forward

from ..errors import HogcError
from ..ir import Index, Node, Op, Variance, build as B, topological_order
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


def _subset_of(b: DerivativeBuilder) -> dict[str, int]:
    """The subset each covered parameter belongs to."""
    return {k: t for t, sub in enumerate(_subsets(b)) for k in sub}


def _accumulate(total: Node | None, term: Node) -> Node:
    return term if total is None else B.add(total, term)


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
            total = _accumulate(total, B.einsum([L[0], L[1:], L[1:]], L[0], [_onehot(b, j, s), u[k], g]))
    return total


PARTITION_STRATEGIES = ("auto", "dense", "unrolled")


#: 'auto' unrolls on a CPU only when the forward pass's contractions average at least this many
#: FLOPs per op: unrolling multiplies the number of kernels, which small layers pay in dispatch.
UNROLL_MIN_FLOPS_PER_OP = 200_000


def _forward_flops_per_op(b: DerivativeBuilder) -> float:
    nodes = [n for n in topological_order([b.output]) if n.op not in (Op.INPUT, Op.CONST)]
    return sum(einsum_flops(n) for n in nodes if n.op is Op.EINSUM) / max(len(nodes), 1)


def _dense(b: DerivativeBuilder, quantity: str) -> bool:
    mode = b.partition_strategy
    if mode == "auto" and b.device_type == "cuda":
        mode, why = "dense", "on CUDA: few large kernels"
    elif mode == "auto":
        per_op = _forward_flops_per_op(b)
        if per_op < UNROLL_MIN_FLOPS_PER_OP:
            mode, why = "dense", f"small layers ({per_op:.0f} forward FLOPs per op): dispatch dominates"
        else:
            mode, why = "unrolled", f"on {b.device_type} with large layers: the fewest FLOPs"
    else:
        why = "asked for (partition_strategy=)"
    b.notes[quantity] = f"{mode} tangents ({why})"
    return mode == "dense"


def _restricted(b: DerivativeBuilder, u: dict[str, Node], index: Index) -> dict[str, Node]:
    """Dense: the S directions as one tangent per parameter: (S, *param), u_k in the row of k's subset."""
    out = {}
    for j, subset in enumerate(_subsets(b)):
        for k in subset:
            L = B.letters(u[k].ndim + 1)
            out[k] = B.einsum([L[0], L[1:]], L, [_onehot(b, j, index), u[k]])
    return out


def _apply_directions(b: DerivativeBuilder, u: dict[str, Node], per_param: dict[str, Node | None],
                      lead: tuple[Index, ...], t: Index) -> Node:
    """Dense: sum_k onehot_t(subset of k) <u_k, per_param_k>: per_param_k has indices (*lead, *param);
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
            total = _accumulate(total, term)
    if total is None:  # the loss does not depend on the covered parameters
        total = B.const_tensor(torch.zeros(tuple(i.size for i in order), dtype=b.dtype), order)
    return total


def _dense_hessian(b: DerivativeBuilder) -> Node:
    u = _direction(b)
    s, t = _subset_index(b, "s"), _subset_index(b, "t")
    hu = _tangent_grads(b, _restricted(b, u, s))  # per parameter (s, *param): (H U)_k, lower
    return _apply_directions(b, u, hu, (s,), t)


def _dense_d3(b: DerivativeBuilder) -> Node:
    u = _direction(b)
    s, t, v = _subset_index(b, "s"), _subset_index(b, "t"), _subset_index(b, "v")
    first = _restricted(b, u, s)
    hu = {k: h for k, h in _tangent_grads(b, first).items() if h is not None}
    seeds: dict[int, Node | None] = {b.params[k].uid: x for k, x in _restricted(b, u, v).items()}
    # the direction is a constant of the expansion: neither u nor the first tangents move with theta
    seeds.update({x.uid: None for x in list(u.values()) + list(first.values())})
    d2 = push_forward(hu, seeds)  # per parameter (v, s, *param)
    return _apply_directions(b, u, d2, (v, s), t)


def _depth_ranks(b: DerivativeBuilder) -> list[int]:
    """Each subset's rank when the subsets are ordered by where their parameters first enter the
    forward graph, input side first. Only the cost depends on this order, never the result."""
    first: dict[int, int] = {}
    for i, node in enumerate(topological_order([b.output])):
        for src in node.src:
            first.setdefault(src.uid, i)
    subsets = _subsets(b)
    key = [min(first.get(b.params[k].uid, len(first)) for k in sub) for sub in subsets]
    order = sorted(range(len(subsets)), key=lambda j: (key[j], j))
    return [order.index(j) for j in range(len(subsets))]


def _along(b: DerivativeBuilder, u: dict[str, Node], j: int, name: str) -> dict[int, Node]:
    """Forward seeds: u restricted to subset j, as one tangent (a size-1 tangent index ``name``)."""
    i = Index(name, 1, TANGENT, Variance.BATCH)
    return {b.params[k].uid: B.reshape(u[k], (1,) + u[k].shape, (i,) + u[k].indices) for k in _subsets(b)[j]}


def _hvps(b: DerivativeBuilder, u: dict[str, Node], rank: list[int]) -> list[dict[str, Node | None]]:
    """H u_s for each subset s, only for the parameters of subsets ranked at or after s (the rest
    follows from symmetry); ``(1, *param)`` per parameter, ``None`` for structural zeros."""
    subsets = _subsets(b)
    grads = {k: _sum_samples_first(b.per_sample_grads[k]) for sub in subsets for k in sub}
    out = []
    for j in range(len(subsets)):
        needed = {k: grads[k] for t, sub in enumerate(subsets) if rank[t] >= rank[j] for k in sub}
        out.append(push_forward(needed, _along(b, u, j, "s")))
    return out


def _dot(x: Node, u: Node) -> Node:
    """<x, u> for x with leading size-1 tangent indices: a scalar."""
    lead = x.ndim - u.ndim
    L = B.letters(lead + u.ndim)
    return B.einsum([L, L[lead:]], "", [x, u])


def _scatter(b: DerivativeBuilder, entries: list[tuple[tuple[int, ...], Node]], out: tuple[Index, ...]) -> Node | None:
    """Scalars summed into the given entries of a zero tensor: one concatenation and one
    scatter-add (no chain of additions, no one-hot products)."""
    if not entries:
        return None
    S, n = len(_subsets(b)), len(out)
    one = Index("e", 1, TANGENT, Variance.BATCH)
    vec = B.cat([B.reshape(x, (1,), (one,)) for _, x in entries], 0,
                indices=(Index("e", len(entries), TANGENT, Variance.BATCH),))
    flat = tuple(sum(a * S ** (n - 1 - d) for d, a in enumerate(at)) for at, _ in entries)
    total = B.index_add(vec, 0, flat, S ** n, Index("entries", S ** n, TANGENT, Variance.BATCH))
    return B.reshape(total, (S,) * n, out)


def _symmetrized(b: DerivativeBuilder, T: Node | None, rank: list[int], out: tuple[Index, ...]) -> Node:
    """The symmetric tensor whose entries at rank-sorted positions are those of T (zero elsewhere):
    D[a, b, ...] = T[(a, b, ...) sorted by rank], one masked, permuted copy of T per permutation."""
    S, n = len(rank), len(out)
    if T is None:  # the loss does not depend on the covered parameters
        return B.const_tensor(torch.zeros((S,) * n, dtype=b.dtype), out)
    L = B.letters(n)
    masks: dict[tuple[int, ...], torch.Tensor] = {}
    for pos in itertools.product(range(S), repeat=n):
        perm = tuple(sorted(range(n), key=lambda a: (rank[pos[a]], a)))
        masks.setdefault(perm, torch.zeros((S,) * n, dtype=b.dtype))[pos] = 1.0
    total = None
    for perm, mask in masks.items():
        term = B.einsum(["".join(L[a] for a in perm), L], L, [T, B.const_tensor(mask, out)], out_indices=out)
        total = _accumulate(total, term)
    return total


@register_quantity("partition_hessian", per_param=False)
def _partition_hessian(b):
    """(S, S): u_s^T H u_t, exact (residual terms included), symmetric: one forward-over-reverse
    pass per subset s, restricted to the subsets t ranked at or after s (or dense)."""
    if _dense(b, "partition_hessian"):
        return _dense_hessian(b)
    u, rank, where = _direction(b), _depth_ranks(b), _subset_of(b)
    out = (_subset_index(b, "s"), _subset_index(b, "t"))
    entries = [((j, where[k]), _dot(x, u[k])) for j, hv in enumerate(_hvps(b, u, rank))
               for k, x in hv.items() if x is not None]
    return _symmetrized(b, _scatter(b, entries, out), rank, out)


def _third(b: DerivativeBuilder, u: dict[str, Node], rank: list[int], diagonal: bool) -> list:
    """D[u_s, u_t, u_v] at rank-sorted (s, t, v) only, pushing H u_s forward along u_t (the direction
    held constant) for the parameters of subsets v ranked at or after t; ``diagonal``: s = t = v.
    Entries (s, t, parameter, its (1, 1, *param) tangent)."""
    subsets, where = _subsets(b), _subset_of(b)
    hvps = _hvps(b, u, rank)
    frozen = {x.uid: None for x in u.values()}
    for j in range(len(subsets)):
        frozen.update({uid: None for uid in _along(b, u, j, "s")})
    entries = []
    for j, hv in enumerate(hvps):
        for t in ([j] if diagonal else [t for t in range(len(subsets)) if rank[t] >= rank[j]]):
            keep = {k: x for k, x in hv.items() if x is not None and (where[k] == t if diagonal else rank[where[k]] >= rank[t])}
            d2 = push_forward(keep, {**frozen, **_along(b, u, t, "v")})
            entries += [(j, t, k, x) for k, x in d2.items() if x is not None]
    return entries


@register_quantity("partition_d3", per_param=False)
def _partition_d3(b):
    """(S, S, S): D^3 L[u_s, u_t, u_v], exact, symmetric in all index permutations; each unordered
    triple is computed once, and the pushes skip the layers where a restricted direction is zero
    (or dense)."""
    if _dense(b, "partition_d3"):
        return _dense_d3(b)
    u, rank, where = _direction(b), _depth_ranks(b), _subset_of(b)
    entries = _third(b, u, rank, diagonal=False)
    out = tuple(_subset_index(b, n) for n in "stv")
    T = _scatter(b, [((j, t, where[k]), _dot(x, u[k])) for j, t, k, x in entries], out)
    return _symmetrized(b, T, rank, out)


@register_quantity("partition_d3_diag", per_param=False)
def _partition_d3_diag(b):
    """(S,): D^3 L[u_s, u_s, u_s], the diagonal of ``partition_d3`` (what the order-3 optimizer uses)."""
    if _dense(b, "partition_d3_diag"):
        S = len(_subsets(b))
        delta = torch.zeros((S,) * 3, dtype=b.dtype)
        delta[range(S), range(S), range(S)] = 1.0
        out = (_subset_index(b, "s"),)
        return B.einsum(["abc", "abc"], "a", [_dense_d3(b), B.const_tensor(delta, tuple(
            _subset_index(b, n) for n in "stv"))], out_indices=out)
    u = _direction(b)
    entries = _third(b, u, _depth_ranks(b), diagonal=True)
    out = (_subset_index(b, "s"),)
    total = _scatter(b, [((j,), _dot(x, u[k])) for j, _, k, x in entries], out)
    if total is None:
        return B.const_tensor(torch.zeros(len(_subsets(b)), dtype=b.dtype), out)
    return total
