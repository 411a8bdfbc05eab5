"""The IR verifier: shapes, topological order and variance pairing.

A contraction must pair an upper with a lower index of the same space (or use the
explicit Euclidean metric, which marks it basis-dependent); ADD/SUB must combine
indices of the same variance and space. Runs after every pass in the test suite.
"""
from __future__ import annotations

import math

from ..errors import VerificationError
from .index import UNIT, Variance
from .node import Constant, Einsum, Node
from .ops import Op
from .printer import format_node
from .program import Program

__all__ = ["verify"]


def _fail(node: Node, names, msg: str):
    raise VerificationError(f"IR verification failed at node {names.get(id(node), '%?')} = "
                            f"{format_node(node, names)}:\n  {msg}")


def _check_shape(node: Node, names) -> None:  # noqa: C901 (a table would be longer)
    op, src, a, shape = node.op, node.src, node.arg, node.shape

    def need(cond, msg):
        if not cond:
            _fail(node, names, msg)

    if op is Op.CONST and not isinstance(a, Constant):
        need(shape == (), "scalar constant with indices")
    elif op is Op.CONST:
        need(tuple(a.tensor.shape) == shape, f"constant shape {tuple(a.tensor.shape)} != indices {shape}")
    elif op is Op.ELEMENTWISE:
        need(all(s.shape == shape for s in src), f"elementwise operand shapes {[s.shape for s in src]} != {shape}")
    elif op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV):
        x, y = src
        n = len(shape)
        need(n == max(x.ndim, y.ndim), "broadcast rank mismatch")
        for k in range(n):
            sx = x.shape[k - n + x.ndim] if k - n + x.ndim >= 0 else 1
            sy = y.shape[k - n + y.ndim] if k - n + y.ndim >= 0 else 1
            need(sx in (1, shape[k]) and sy in (1, shape[k]) and max(sx, sy) == shape[k],
                 f"size mismatch in axis {k}: {sx} vs {sy} -> {shape[k]}")
    elif op is Op.EINSUM:
        eq: Einsum = a
        need(len(eq.inputs) == len(src), "operand count != equation")
        sizes: dict[str, int] = {}
        for s, x in zip(eq.inputs, src):
            need(len(s) == x.ndim, f"operand '{s}' has rank {x.ndim}")
            for ch, ix in zip(s, x.indices):
                if sizes.setdefault(ch, ix.size) != ix.size:
                    _fail(node, names, f"letter '{ch}' has sizes {sizes[ch]} and {ix.size}")
        need(len(eq.output) == len(shape) and all(sizes.get(ch) == d for ch, d in zip(eq.output, shape)),
             f"output '{eq.output}' does not match shape {shape}")
    elif op is Op.SUM:
        x = src[0]
        need(tuple(d for k, d in enumerate(x.shape) if k not in a) == shape, "sum shape")
    elif op is Op.RESHAPE:
        need(math.prod(src[0].shape) == math.prod(shape) and tuple(a) == shape, "reshape sizes")
    elif op is Op.PERMUTE:
        need(sorted(a) == list(range(src[0].ndim)) and tuple(src[0].shape[p] for p in a) == shape, "permute")
    elif op is Op.EXPAND:
        x = src[0]
        pad = len(shape) - x.ndim
        need(pad >= 0 and all(d in (1, shape[k + pad]) for k, d in enumerate(x.shape)), "expand")
    elif op is Op.SLICE:
        dim, start, stop, step = a
        exp = list(src[0].shape)
        exp[dim] = len(range(start, stop, step))
        need(tuple(exp) == shape, "slice shape")
    elif op is Op.PAD:
        dim, start, step, size = a
        x = src[0]
        need(start + step * (x.shape[dim] - 1) < size and shape[dim] == size, "pad range")
    elif op is Op.INDEX:
        dim, idx = a
        need(shape[dim] == len(idx) and all(0 <= i < src[0].shape[dim] for i in idx), "index range")
    elif op is Op.INDEX_ADD:
        dim, idx, size = a
        need(src[0].shape[dim] == len(idx) and shape[dim] == size, "index_add sizes")
    elif op is Op.GATHER:
        x, idx = src
        need(a < 0 and x.ndim == len(shape) and idx.ndim <= len(shape) and idx.ndim >= -a, "gather axes")
        need(all(d == (idx.shape[a] if k == len(shape) + a else x.shape[k]) for k, d in enumerate(shape))
             and all(d in (1, shape[k - idx.ndim]) for k, d in enumerate(idx.shape)), "gather shape")
    elif op is Op.SCATTER_ADD:
        v, idx = src
        dim, size = a
        need(dim < 0 and v.ndim == len(shape) and -dim <= idx.ndim <= v.ndim and shape[dim] == size
             and all(d in (1, v.shape[k - idx.ndim]) for k, d in enumerate(idx.shape)), "scatter_add shape")
    elif op is Op.CAT:
        need(sum(x.shape[a] for x in src) == shape[a], "cat sizes")
    elif op is Op.WINDOWS:
        dim, K, dil, O, stride = a
        x = src[0]
        need(x.shape[dim] >= (K - 1) * dil + (O - 1) * stride + 1
             and shape == x.shape[:dim] + (K, O) + x.shape[dim + 1:], "windows shape")
    elif op is Op.SQUARE_PRODUCT:
        prod, sq, _ = a
        need(len(prod.inputs) == 2 and len(src) == 2 and sq.inputs == (prod.output, prod.output), "square of a product")
        sizes = {}
        for s, x in zip(prod.inputs, src):
            need(len(s) == x.ndim and all(sizes.setdefault(c, d) == d for c, d in zip(s, x.shape)),
                 "square_product operand sizes")
        need(all(c in prod.output for c in sq.output) and tuple(sizes.get(c) for c in sq.output) == shape,
             "square_product result shape")
    elif op is Op.NONDIFF:
        from .nondiff import NONDIFF_FUNCTIONS
        need(a[0] in NONDIFF_FUNCTIONS and NONDIFF_FUNCTIONS[a[0]].shape(a[1], src[0].shape) == shape,
             "piecewise-constant function shape")
    elif op is Op.EIGVALSH:
        x = src[0]
        need(x.ndim == 2 and x.shape[0] == x.shape[1] and shape == (min(a, x.shape[0]),), "eigvalsh of a square matrix")


def _check_variance(node: Node, names) -> None:
    if node.op is Op.EINSUM:
        eq: Einsum = node.arg
        occ: dict[str, list] = {}
        for s, x in zip(eq.inputs, node.src):
            for ch, ix in zip(s, x.indices):
                occ.setdefault(ch, []).append(ix)
        for ch, ixs in occ.items():
            spaces = {ix.space for ix in ixs if ix.space != UNIT and ix.size != 1}
            if len(spaces) > 1:
                _fail(node, names, f"letter '{ch}' joins indices of different spaces {sorted(spaces)}")
            if ch in eq.output or ch in eq.metric:
                continue
            if any(ix.size == 1 and ix.space == UNIT for ix in ixs):
                continue  # a size-1 broadcast axis: summing it is a reshape
            var = [ix.variance for ix in ixs]
            if all(v is Variance.BATCH for v in var):
                continue
            if len(var) == 2 and set(var) == {Variance.UP, Variance.LOW}:
                continue
            kinds = ", ".join(f"{ix.name}{ix.variance.value}" for ix in ixs)
            if len(var) == 2 and var[0] is var[1]:
                word = "two lower" if var[0] is Variance.LOW else "two upper"
                _fail(node, names, f"contracts {word} indices over letter '{ch}' ({kinds}) without a metric")
            _fail(node, names, f"letter '{ch}' ({kinds}) is summed but is not an upper/lower pair")
    elif node.op in (Op.ADD, Op.SUB):
        x, y = node.src
        n = node.ndim
        for k in range(n):
            ix = x.indices[k - n + x.ndim] if k - n + x.ndim >= 0 else None
            iy = y.indices[k - n + y.ndim] if k - n + y.ndim >= 0 else None
            if ix is None or iy is None or ix.size == 1 or iy.size == 1:
                continue
            if ix.variance is not iy.variance:
                _fail(node, names, f"{node.op.name.lower()} of indices with different variance in axis {k}: "
                                   f"{ix} and {iy} (a vector plus a covector needs a metric)")
            if ix.space != iy.space:
                _fail(node, names, f"{node.op.name.lower()} of indices from different spaces in axis {k}: "
                                   f"{ix.space} and {iy.space}")


def _kept_axes(node: Node) -> list[tuple[int, int, int]]:
    """(source, source axis, output axis) of the axes an index-preserving op passes through."""
    op, a = node.op, node.arg
    if op is Op.ELEMENTWISE:
        return [(j, k, k) for j in range(len(node.src)) for k in range(node.ndim)]
    if op is Op.PERMUTE:
        return [(0, p, k) for k, p in enumerate(a)]
    if op is Op.SUM:
        kept = [k for k in range(node.src[0].ndim) if k not in a]
        return [(0, kk, k) for k, kk in enumerate(kept)]
    if op in (Op.SLICE, Op.INDEX, Op.PAD, Op.INDEX_ADD):
        return [(0, k, k) for k in range(node.ndim) if k != a[0]]
    if op in (Op.GATHER, Op.SCATTER_ADD):
        dim = node.ndim + (a if op is Op.GATHER else a[0])
        return [(0, k, k) for k in range(node.ndim) if k != dim]
    if op is Op.CAT:
        return [(j, k, k) for j in range(len(node.src)) for k in range(node.ndim) if k != a]
    if op is Op.EXPAND:
        x = node.src[0]
        off = node.ndim - x.ndim
        return [(0, k, k + off) for k in range(x.ndim) if x.shape[k] == node.shape[k + off]]
    return []


def _check_kept(node: Node, names) -> None:
    for j, k, o in _kept_axes(node):
        a, b = node.src[j].indices[k], node.indices[o]
        if a.size == 1 or b.size == 1:
            continue
        if a.variance is not b.variance or a.space != b.space:
            _fail(node, names, f"{node.op.name.lower()} changes index {a} (space {a.space}) of source {j} axis {k} "
                               f"into {b} (space {b.space}); only a metric may change a variance")


def verify(program: Program) -> Program:
    """Check a program; raise :class:`VerificationError` naming the offending node."""
    names: dict[int, str] = {}
    for k, node in enumerate(program.nodes):
        for s in node.src:
            if id(s) not in names:
                _fail(node, names, f"source %{s.uid} ({s.op.name}) is not scheduled before its use")
        names[id(node)] = f"%{k}"
        _check_shape(node, names)
        _check_variance(node, names)
        _check_kept(node, names)
    for key, out in program.outputs.items():
        if id(out) not in names:
            raise VerificationError(f"output '{key}' is not in the schedule")
    return program
