"""Forward-mode rules, one table keyed by op (like JAX's ``primitive_jvps``).

A tangent carries one leading batch index ``s`` (S directions travel together) in front of
the value's own indices: the tangent of ``v`` has indices ``(s,) + v.indices``. A rule gets
the tangents of the sources (``None`` for a structural zero, a source that does not depend
on the inputs being perturbed) and returns the tangent of the node, or ``None``.

Applied to a derivative program, forward mode gives Hessian-vector products
(forward-over-reverse). Derivative nodes are covered: ``ELEMENTWISE`` of order k moves to
order k+1, and ``LOSS_GRAD`` moves to the loss Hessian through its exact square root.
"""
from __future__ import annotations

from typing import Callable

from hogc.capture.losses import num_columns
from hogc.errors import MissingRuleError
from hogc.ir import COLUMN, Index, Node, Op, Variance, build as B
from hogc.ir.node import Einsum

from . import elementwise as E

__all__ = ["jvp_rules", "align", "full"]

jvp_rules: dict[Op, Callable] = {}


def defjvp(*ops: Op):
    def deco(fn):
        for op in ops:
            if op in jvp_rules:
                raise ValueError(f"JVP rule for {op} registered twice")
            jvp_rules[op] = fn
        return fn
    return deco


def align(t: Node | None, x: Node, node: Node) -> Node | None:
    """Tangent of source ``x`` with size-1 axes inserted so it broadcasts like ``x`` against ``node``."""
    if t is None or x.ndim == node.ndim:
        return t
    pad = node.ndim - x.ndim
    return B.reshape(t, (t.shape[0],) + (1,) * pad + x.shape)


def _sum(terms: list[Node | None]) -> Node | None:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else B.add(out, t)
    return out


def full(t: Node | None, node: Node) -> Node | None:
    """A tangent has the node's full shape: broadcast one that came from a broadcast source."""
    if t is None:
        return None
    shape = (t.shape[0],) + node.shape
    return t if t.shape == shape else B.expand(t, shape, (t.indices[0],) + node.indices)


@defjvp(Op.ADD, Op.SUB)
def _add(node, tangents):
    a, b = (align(t, x, node) for t, x in zip(tangents, node.src))
    if node.op is Op.SUB and b is not None:
        b = B.scale(b, -1.0)
    return full(_sum([a, b]), node)


@defjvp(Op.MUL)
def _mul(node, tangents):
    (ta, tb), (a, b) = tangents, node.src
    return full(_sum([B.mul(align(ta, a, node), b) if ta is not None else None,
                      B.mul(a, align(tb, b, node)) if tb is not None else None]), node)


@defjvp(Op.DIV)
def _div(node, tangents):
    (ta, tb), (a, b) = tangents, node.src
    num = _sum([align(ta, a, node), B.scale(B.mul(node, align(tb, b, node)), -1.0) if tb is not None else None])
    return full(B.div(num, b), node)


@defjvp(Op.EINSUM)
def _einsum(node, tangents):
    eq: Einsum = node.arg
    s = B.fresh_letters("".join(eq.inputs) + eq.output, 1)
    terms = []
    for k, t in enumerate(tangents):
        if t is None:
            continue
        inputs = list(eq.inputs)
        inputs[k] = s + inputs[k]
        src = list(node.src)
        src[k] = t
        terms.append(B.einsum(inputs, s + eq.output, src, metric=eq.metric,
                              out_indices=(t.indices[0],) + node.indices))
    return _sum(terms)


@defjvp(Op.ELEMENTWISE)
def _elementwise(node, tangents):
    fname, order, params = node.arg
    t = tangents[0]  # the tangent of x; a y source is f(x), carried along
    if t is None:
        return None
    if E.is_zero(fname, order + 1):
        return None
    if order + 1 > E.MAX_ORDER:
        raise MissingRuleError(f"{fname} has derivatives up to order {E.MAX_ORDER} registered")
    x = node.src[0]
    y = node if order == 0 else (node.src[1] if len(node.src) > 1 else B.elementwise(fname, 0, params, x))
    d = B.elementwise(fname, order + 1, params, x, y if E.uses_output(fname, order + 1) else None)
    return B.mul(t, d)


def _structural(node: Node, t: Node) -> Node:
    """Apply a linear structural op to a tangent (one more leading axis)."""
    a = node.arg
    s = t.indices[0]
    if node.op is Op.SUM:
        return B.sum_dims(t, [d + 1 for d in a])
    if node.op is Op.RESHAPE:
        return B.reshape(t, (s.size,) + tuple(a), (s,) + node.indices)
    if node.op is Op.PERMUTE:
        return B.permute(t, [0] + [p + 1 for p in a])
    if node.op is Op.EXPAND:
        return B.expand(t, (s.size,) + tuple(a), (s,) + node.indices)
    if node.op is Op.SLICE:
        dim, start, stop, step = a
        return B.slice_(t, dim + 1, start, stop, step, indices=(s,) + node.indices)
    if node.op is Op.PAD:
        dim, start, step, size = a
        return B.pad(t, dim + 1, start, step, size, node.indices[dim])
    if node.op is Op.INDEX:
        dim, idx = a
        return B.index(t, dim + 1, idx, indices=(s,) + node.indices)
    if node.op is Op.INDEX_ADD:
        dim, idx, size = a
        return B.index_add(t, dim + 1, idx, size, node.indices[dim])
    raise AssertionError(node.op)


@defjvp(Op.SUM, Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.PAD, Op.INDEX, Op.INDEX_ADD)
def _linear(node, tangents):
    t = tangents[0]
    if t is None:
        return None
    if node.op is Op.EXPAND:
        t = align(t, node.src[0], node)
    return _structural(node, t)


@defjvp(Op.GATHER, Op.SCATTER_ADD)
def _gather(node, tangents):
    t = tangents[0]
    if t is None:
        return None
    s = t.indices[0]
    if node.op is Op.GATHER:
        return B.gather(t, node.src[1], node.arg, indices=(s,) + node.indices)
    dim, size = node.arg
    return B.scatter_add(t, node.src[1], dim, size, node.indices[dim])


@defjvp(Op.CAT)
def _cat(node, tangents):
    if all(t is None for t in tangents):
        return None
    S = next(t for t in tangents if t is not None).indices[0]
    parts = []
    for t, x in zip(tangents, node.src):
        if t is None:  # an explicit zero block, built from the value itself
            t = B.scale(B.expand(B.reshape(x, (1,) + x.shape), (S.size,) + x.shape, (S,) + x.indices), 0.0)
        parts.append(t)
    return B.cat(parts, node.arg + 1, indices=(S,) + node.indices)


@defjvp(Op.LOSS_GRAD)
def _loss_grad(node, tangents):
    """d/df of dL/df is the loss Hessian, block-diagonal over samples: apply it as
    ``S (S^T f')`` with the exact square root S (shared with the GGN programs)."""
    t = tangents[0]
    if t is None:
        return None
    f, y = node.src
    c = Index("c", num_columns(node.arg, f.shape), COLUMN, Variance.BATCH)
    S = Node(Op.LOSS_SQRT_HESSIAN, (f, y), node.arg, (c,) + node.indices)
    L = B.letters(2 * f.ndim + 1)
    cc, s, O = L[0], L[1], L[2:2 + f.ndim]
    P = O[0] + L[2 + f.ndim:]  # the sample axis (f's first) is shared: samples do not mix
    return B.einsum([cc + O, s + O, cc + P], s + P, [S, t, S], out_indices=(t.indices[0],) + node.indices)


@defjvp(Op.LOSS_SQRT_HESSIAN)
def _loss_sqrt_hessian(node, tangents):
    """The square root's own directional derivative (closed forms per loss, in the runtime): what a
    second forward push through a Hessian-vector program needs (third derivatives)."""
    t = tangents[0]
    if t is None:
        return None
    f, y = node.src
    return Node(Op.LOSS_SQRT_HESSIAN_JVP, (f, y, t), node.arg, (t.indices[0],) + node.indices)


@defjvp(Op.LOSS)
def _loss(node, tangents):
    t = tangents[0]
    if t is None:
        return None
    f, y = node.src
    g = Node(Op.LOSS_GRAD, (f, y), node.arg, tuple(i.dual() for i in f.indices))
    L = B.letters(f.ndim + 1)
    return B.einsum([L[1:], L], L[0], [g, t], out_indices=(t.indices[0],))


@defjvp(Op.NONDIFF)
def _nondiff(node, tangents):
    return None  # piecewise constant (hogc.ir.nondiff)
