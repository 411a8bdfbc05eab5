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

__all__ = ["vjp_rules", "rule_kinds", "VjpContext", "cot_indices", "deflinear", "defmultilinear", "defrule"]


@dataclass(frozen=True)
class VjpContext:
    lead: tuple[Index, ...]  # extra batch indices of the cotangent (e.g. columns)
    sample: Index  # the sample index of the model output
    needs: Callable[[Node], bool]  # does this source need a cotangent?
    #: write an activation's Hadamard product as an einsum, so fusion keeps a column that is a
    #: product of factors one product (Hessian-backpropagation columns use it)
    hadamard_einsum: bool = False

    def layout(self, v: Node) -> tuple[Index, ...]:
        return cot_indices(v, self.lead, self.sample)

    def nlead(self, v: Node) -> int:
        return len(self.lead) + (0 if v.has_sample else 1)


def cot_indices(v: Node, lead: tuple[Index, ...], sample: Index) -> tuple[Index, ...]:
    return tuple(lead) + (() if v.has_sample else (sample,)) + dual(v.indices)


vjp_rules: dict[Op, Callable] = {}
#: the structural kind of each op's rule: "linear" (the rule is the transpose; second
#: derivatives vanish), "multilinear" (linear in each source separately: einsum, Hadamard
#: product), "elementwise" (sympy-derived), or "custom".
rule_kinds: dict[Op, str] = {}


def _register(ops, kind: str, rule: Callable) -> None:
    for op in ops:
        if op in vjp_rules:
            raise ValueError(f"VJP rule for {op} registered twice")
        vjp_rules[op] = rule
        rule_kinds[op] = kind


def _per_source(kind: str, *ops: Op):
    """Register ``transpose(node, cot, ctx, k)``, the cotangent of source k, for every source that
    needs one (the rest get the structural zero ``None``)."""
    def deco(transpose):
        def rule(node, cot, ctx):
            return [transpose(node, cot, ctx, k) if ctx.needs(s) else None for k, s in enumerate(node.src)]
        rule.__name__ = f"vjp_{transpose.__name__.strip('_')}"
        _register(ops, kind, rule)
        return transpose
    return deco


def deflinear(*ops: Op):
    """An op linear in its sources: its VJP is its transpose, with no other operand involved."""
    return _per_source("linear", *ops)


def defmultilinear(*ops: Op):
    """An op linear in each source separately: source k's cotangent is the op with the cotangent in
    place of source k, transposed; it involves the other operands (a bilinear cross term)."""
    return _per_source("multilinear", *ops)


def defrule(kind: str, *ops: Op):
    """A hand-written rule ``rule(node, cot, ctx) -> [cotangent or None per source]``."""
    def deco(rule):
        _register(ops, kind, rule)
        return rule
    return deco


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


@defmultilinear(Op.EINSUM)
def _einsum(node: Node, cot: Node, ctx: VjpContext, k: int) -> Node:
    eq: Einsum = node.arg
    x = node.src[k]
    used = "".join(eq.inputs) + eq.output
    lead = B.fresh_letters(used, ctx.nlead(node))
    cot_s = lead + eq.output
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
    out_s = res_lead + "".join(s_k[d] for d in kept)
    # a hyperedge of the node's result (an output letter in two or more operands, like a window
    # index shared by a pooling pattern and its argmax mask) is summed here over three or more
    # operands: a basis-dependent (diagonal) contraction, marked like a metric one
    terms = [cot_s] + [s for s, _ in others]
    hyper = {ch for ch in eq.output if ch not in out_s and sum(ch in t for t in terms) > 2
             and not node.indices[eq.output.index(ch)].is_batch}
    r = B.einsum(terms, out_s,
                 [cot] + [o for _, o in others], metric=eq.metric | hyper,
                 out_indices=layout[:xl] + tuple(layout[xl + d] for d in kept))
    return _broadcast_back(r, x, node, ctx, missing) if missing else r


@deflinear(Op.ADD, Op.SUB)
def _add(node, cot, ctx, k):
    t = B.scale(cot, -1.0) if node.op is Op.SUB and k == 1 else cot
    return unbroadcast(t, node.src[k], node, ctx)


@defmultilinear(Op.MUL)
def _mul(node, cot, ctx, k):
    return unbroadcast(B.mul(cot, node.src[1 - k]), node.src[k], node, ctx)


@defrule("custom", Op.DIV)
def _div(node, cot, ctx):
    a, b = node.src
    ca = unbroadcast(B.div(cot, b), a, node, ctx) if ctx.needs(a) else None
    cb = unbroadcast(B.scale(B.mul(cot, B.div(node, b)), -1.0), b, node, ctx) if ctx.needs(b) else None
    return [ca, cb]


@defrule("elementwise", Op.ELEMENTWISE)
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
    if ctx.hadamard_einsum:
        L = B.letters(cot.ndim)
        return [B.einsum([L, L[cot.ndim - d.ndim:]], L, [cot, d], out_indices=cot.indices)]
    return [B.mul(cot, d)]


@deflinear(Op.SUM)
def _sum(node, cot, ctx, k):
    x = node.src[0]
    return _broadcast_back(cot, x, node, ctx, list(node.arg))


@deflinear(Op.RESHAPE)
def _reshape(node, cot, ctx, k):
    x = node.src[0]
    layout = ctx.layout(x)
    return B.reshape(cot, [i.size for i in layout], layout)


@deflinear(Op.PERMUTE)
def _permute(node, cot, ctx, k):
    nl = ctx.nlead(node)
    inv = [0] * len(node.arg)
    for j, p in enumerate(node.arg):
        inv[p] = j
    return B.permute(cot, list(range(nl)) + [nl + p for p in inv])


@deflinear(Op.EXPAND)
def _expand(node, cot, ctx, k):
    return unbroadcast(cot, node.src[0], node, ctx)


@deflinear(Op.SLICE)
def _slice(node, cot, ctx, k):
    x = node.src[0]
    dim, start, stop, step = node.arg
    nl = ctx.nlead(node)
    return B.pad(cot, nl + dim, start, step, x.shape[dim], ctx.layout(x)[ctx.nlead(x) + dim])


@deflinear(Op.PAD)
def _pad(node, cot, ctx, k):
    x = node.src[0]
    dim, start, step, size = node.arg
    nl = ctx.nlead(node)
    stop = start + step * (x.shape[dim] - 1) + 1
    return B.slice_(cot, nl + dim, start, stop, step, indices=ctx.layout(x))


@deflinear(Op.INDEX)
def _index(node, cot, ctx, k):
    x = node.src[0]
    dim, idx = node.arg
    nl = ctx.nlead(node)
    return B.index_add(cot, nl + dim, idx, x.shape[dim], ctx.layout(x)[ctx.nlead(x) + dim])


@deflinear(Op.INDEX_ADD)
def _index_add(node, cot, ctx, k):
    x = node.src[0]
    dim, idx, size = node.arg
    return B.index(cot, ctx.nlead(node) + dim, idx, indices=ctx.layout(x))


@deflinear(Op.GATHER)
def _gather(node, cot, ctx, k):
    if k == 1:
        return None  # integer indices
    x = node.src[0]
    return B.scatter_add(cot, node.src[1], node.arg, x.shape[node.arg], ctx.layout(x)[node.arg])


@deflinear(Op.SCATTER_ADD)
def _scatter_add(node, cot, ctx, k):
    if k == 1:
        return None
    return B.gather(cot, node.src[1], node.arg[0], indices=ctx.layout(node.src[0]))


@deflinear(Op.CAT)
def _cat(node, cot, ctx, k):
    dim = node.arg
    start = sum(x.shape[dim] for x in node.src[:k])
    x = node.src[k]
    return B.slice_(cot, ctx.nlead(node) + dim, start, start + x.shape[dim], 1, indices=ctx.layout(x))


@defrule("piecewise-constant", Op.NONDIFF)
def _nondiff(node, cot, ctx):
    return [None] * len(node.src)  # zero derivative: selections, encodings, shifts, masks (hogc.ir.nondiff)
