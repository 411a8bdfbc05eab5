"""Reverse-mode rules, one table keyed by op (like JAX's ``primitive_transposes``).

Every cotangent carries extra leading batch indices ``lead`` (e.g. the C columns of the
loss-Hessian square root) and, for a value without a sample axis (a parameter, or
anything computed from parameters only), the sample axis in front: reverse mode is
*vmapped over samples*, so per-sample quantities are a contraction that keeps ``n`` and
the batch gradient is the same contraction summing it. A rule returns one entry per
source, ``None`` for a structural zero (a source that needs no cotangent).

Layout of the cotangent of ``v``: ``lead + (n if v has no sample axis) + dual(v.indices)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hogc.errors import MissingRuleError
from hogc.ir import Index, Node, Op, build as B, dual
from hogc.ir.node import Einsum

from . import elementwise as E

__all__ = ["vjp_rules", "VjpContext", "cot_indices"]


@dataclass(frozen=True)
class VjpContext:
    lead: tuple[Index, ...]  # extra batch indices of the cotangent (e.g. columns)
    sample: Index  # the sample index of the model output
    needs: Callable[[Node], bool]  # does this source need a cotangent?

    def layout(self, v: Node) -> tuple[Index, ...]:
        return cot_indices(v, self.lead, self.sample)

    def nlead(self, v: Node) -> int:
        return len(self.lead) + (0 if v.has_sample else 1)


def cot_indices(v: Node, lead: tuple[Index, ...], sample: Index) -> tuple[Index, ...]:
    return tuple(lead) + (() if v.has_sample else (sample,)) + dual(v.indices)


vjp_rules: dict[Op, Callable] = {}


def defrule(*ops: Op):
    def deco(fn):
        for op in ops:
            if op in vjp_rules:
                raise ValueError(f"VJP rule for {op} registered twice")
            vjp_rules[op] = fn
        return fn
    return deco


def _fresh_letters(used: str, n: int) -> str:
    out, k = "", 0
    while len(out) < n:
        ch = B.letters(1, k)
        if ch not in used and ch not in out:
            out += ch
        k += 1
    return out


def unbroadcast(t: Node, x: Node, node: Node, ctx: VjpContext) -> Node:
    """Sum a node-shaped cotangent ``t`` down to the shape of source ``x`` (broadcast transpose)."""
    nl = ctx.nlead(node)
    L = B.letters(nl + node.ndim)
    lead, D = L[:nl], L[nl:]
    off = node.ndim - x.ndim
    out = lead
    if not x.has_sample and node.has_sample:
        out += D[node.sample_axis()]
    kept = [k for k in range(x.ndim) if x.shape[k] == node.shape[k + off]]
    out += "".join(D[k + off] for k in kept)
    layout = ctx.layout(x)
    xl = ctx.nlead(x)
    # summing over broadcast axes pairs them with a vector of ones: basis-dependent, so explicit
    summed = "".join(ch for ch in L if ch not in out)
    r = B.einsum([L], out, [t], metric=summed, out_indices=layout[:xl] + tuple(layout[xl + k] for k in kept))
    return B.reshape(r, [i.size for i in layout], layout)


def _broadcast_back(t: Node, x: Node, node: Node, ctx: VjpContext, missing: list[int]) -> Node:
    """Insert the axes ``missing`` (of x) into ``t`` and expand: the transpose of a sum."""
    layout = ctx.layout(x)
    xl = ctx.nlead(x)
    shape1 = [1 if (k - xl) in missing else i.size for k, i in enumerate(layout)]
    idx1 = tuple(i if shape1[k] != 1 or i.size == 1 else Index("1", 1, "unit", i.variance)
                 for k, i in enumerate(layout))
    r = B.reshape(t, shape1, idx1)
    return B.expand(r, [i.size for i in layout], layout)


@defrule(Op.EINSUM)
def _einsum(node: Node, cot: Node, ctx: VjpContext):
    eq: Einsum = node.arg
    used = "".join(eq.inputs) + eq.output
    nl = ctx.nlead(node)
    lead = _fresh_letters(used, nl)
    cot_s = lead + eq.output
    outs = []
    for k, x in enumerate(node.src):
        if not ctx.needs(x):
            outs.append(None)
            continue
        s_k = eq.inputs[k]
        res_lead = lead
        if node.has_sample and not x.has_sample:
            res_lead = lead + eq.output[node.sample_axis()]
        others = [(eq.inputs[j], node.src[j]) for j in range(len(node.src)) if j != k]
        present = set(cot_s) | set("".join(s for s, _ in others))
        missing = [d for d, ch in enumerate(s_k) if ch not in present]
        layout = ctx.layout(x)
        xl = ctx.nlead(x)
        kept = [d for d in range(x.ndim) if d not in missing]
        r = B.einsum([cot_s] + [s for s, _ in others], res_lead + "".join(s_k[d] for d in kept),
                     [cot] + [o for _, o in others], metric=eq.metric,
                     out_indices=layout[:xl] + tuple(layout[xl + d] for d in kept))
        outs.append(_broadcast_back(r, x, node, ctx, missing) if missing else r)
    return outs


@defrule(Op.ADD, Op.SUB)
def _add(node, cot, ctx):
    a, b = node.src
    ca = unbroadcast(cot, a, node, ctx) if ctx.needs(a) else None
    cb = None
    if ctx.needs(b):
        t = B.scale(cot, -1.0) if node.op is Op.SUB else cot
        cb = unbroadcast(t, b, node, ctx)
    return [ca, cb]


@defrule(Op.MUL)
def _mul(node, cot, ctx):
    a, b = node.src
    return [unbroadcast(B.mul(cot, b), a, node, ctx) if ctx.needs(a) else None,
            unbroadcast(B.mul(cot, a), b, node, ctx) if ctx.needs(b) else None]


@defrule(Op.DIV)
def _div(node, cot, ctx):
    a, b = node.src
    ca = unbroadcast(B.div(cot, b), a, node, ctx) if ctx.needs(a) else None
    cb = unbroadcast(B.scale(B.mul(cot, B.div(node, b)), -1.0), b, node, ctx) if ctx.needs(b) else None
    return [ca, cb]


@defrule(Op.ELEMENTWISE)
def _elementwise(node, cot, ctx):
    fname, order, params = node.arg
    if order != 0:
        raise MissingRuleError(f"no reverse-mode rule for derivative node {fname} of order {order} "
                               f"(needed for third-order quantities)")
    x = node.src[0]
    if E.is_zero(fname, 1):
        return [None]
    d_expr = E.derivative_expr(fname, 1)
    if not d_expr.free_symbols & {E.x, E.y} and not any(str(s) in E.ELEMENTWISE_FNS[fname].params
                                                        for s in d_expr.free_symbols):
        return [B.scale(cot, float(d_expr))]
    d = B.elementwise(fname, 1, params, x, node if E.uses_output(fname, 1) else None)
    return [B.mul(cot, d)]


@defrule(Op.SUM)
def _sum(node, cot, ctx):
    x = node.src[0]
    return [_broadcast_back(cot, x, node, ctx, list(node.arg))]


@defrule(Op.RESHAPE)
def _reshape(node, cot, ctx):
    x = node.src[0]
    layout = ctx.layout(x)
    return [B.reshape(cot, [i.size for i in layout], layout)]


@defrule(Op.PERMUTE)
def _permute(node, cot, ctx):
    nl = ctx.nlead(node)
    inv = [0] * len(node.arg)
    for k, p in enumerate(node.arg):
        inv[p] = k
    return [B.permute(cot, list(range(nl)) + [nl + p for p in inv])]


@defrule(Op.EXPAND)
def _expand(node, cot, ctx):
    return [unbroadcast(cot, node.src[0], node, ctx)]


@defrule(Op.SLICE)
def _slice(node, cot, ctx):
    x = node.src[0]
    dim, start, stop, step = node.arg
    nl = ctx.nlead(node)
    return [B.pad(cot, nl + dim, start, step, x.shape[dim], ctx.layout(x)[ctx.nlead(x) + dim])]


@defrule(Op.PAD)
def _pad(node, cot, ctx):
    x = node.src[0]
    dim, start, step, size = node.arg
    nl = ctx.nlead(node)
    stop = start + step * (x.shape[dim] - 1) + 1
    return [B.slice_(cot, nl + dim, start, stop, step, indices=ctx.layout(x))]


@defrule(Op.INDEX)
def _index(node, cot, ctx):
    x = node.src[0]
    dim, idx = node.arg
    nl = ctx.nlead(node)
    return [B.index_add(cot, nl + dim, idx, x.shape[dim], ctx.layout(x)[ctx.nlead(x) + dim])]


@defrule(Op.INDEX_ADD)
def _index_add(node, cot, ctx):
    x = node.src[0]
    dim, idx, size = node.arg
    return [B.index(cot, ctx.nlead(node) + dim, idx, indices=ctx.layout(x))]


@defrule(Op.CAT)
def _cat(node, cot, ctx):
    dim = node.arg
    nl = ctx.nlead(node)
    outs, s = [], 0
    for x in node.src:
        n = x.shape[dim]
        outs.append(B.slice_(cot, nl + dim, s, s + n, 1, indices=ctx.layout(x)) if ctx.needs(x) else None)
        s += n
    return outs
