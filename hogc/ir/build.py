"""Builders: construct IR nodes, inferring output indices from the inputs.

Passes call these instead of ``Node(...)`` so index bookkeeping lives in one place. A
builder may return an existing node for a trivial case (reshape to the same shape).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from opt_einsum import get_symbol

from .index import UNIT, Index, Variance, unit
from .node import Constant, Einsum, Node
from .ops import Op

__all__ = [
    "letters", "fresh_letters", "delta", "inp", "const", "const_tensor", "elementwise", "binary", "add", "sub", "mul",
    "div", "einsum", "sum_dims", "reshape", "permute", "expand", "slice_", "pad", "index",
    "index_add", "gather", "scatter_add", "cat", "unsqueeze", "broadcast_indices", "scale", "reshape_groups",
]


def letters(n: int, start: int = 0) -> str:
    return "".join(get_symbol(i) for i in range(start, start + n))


def fresh_letters(used: str, n: int) -> str:
    """``n`` einsum letters not in ``used``."""
    out, k = "", 0
    while len(out) < n:
        ch = get_symbol(k)
        if ch not in used and ch not in out:
            out += ch
        k += 1
    return out


def inp(role: str, name: str, indices: Sequence[Index], where=None) -> Node:
    return Node(Op.INPUT, (), (role, name), tuple(indices), where)


def const(value: float) -> Node:
    return Node(Op.CONST, (), float(value), ())


def const_tensor(tensor, indices: Sequence[Index]) -> Node:
    return Node(Op.CONST, (), Constant(tensor), tuple(indices))


def elementwise(fname: str, order: int, params: tuple, x: Node, y: Node | None = None,
                where=None) -> Node:
    src = (x,) if y is None else (x, y)
    return Node(Op.ELEMENTWISE, src, (fname, order, tuple(params)), x.indices, where)


def broadcast_indices(a: tuple[Index, ...], b: tuple[Index, ...]) -> tuple[Index, ...]:
    """numpy-style broadcast: align from the right, a size-1 axis takes the other's index."""
    n = max(len(a), len(b))
    out = []
    for k in range(n):
        ia = a[k - n + len(a)] if k - n + len(a) >= 0 else None
        ib = b[k - n + len(b)] if k - n + len(b) >= 0 else None
        if ia is None or (ia.size == 1 and ib is not None and ib.size != 1):
            out.append(ib)
        else:
            out.append(ia)
    return tuple(out)


def binary(op: Op, a: Node, b: Node, indices=None, where=None) -> Node:
    return Node(op, (a, b), None, indices or broadcast_indices(a.indices, b.indices), where)


def _is_const(x: Node, v: float) -> bool:
    return x.op is Op.CONST and not isinstance(x.arg, Constant) and x.arg == v


def add(a: Node, b: Node, where=None) -> Node:
    return binary(Op.ADD, a, b, where=where)


def sub(a: Node, b: Node, where=None) -> Node:
    return binary(Op.SUB, a, b, where=where)


def mul(a: Node, b: Node, where=None) -> Node:
    if _is_const(b, 1.0) and a.ndim >= b.ndim:
        return a
    return binary(Op.MUL, a, b, where=where)


def scale(a: Node, c: float) -> Node:
    return mul(a, const(c))


def div(a: Node, b: Node, where=None) -> Node:
    return binary(Op.DIV, a, b, where=where)


def delta(a: Index, b: Index, dtype) -> Node:
    """The Kronecker delta between two indices of one size (an identity matrix einsums eliminate)."""
    import torch

    return Node(Op.CONST, (), Constant(torch.eye(a.size, dtype=dtype), delta=True), (a, b))


def _is_delta(x: Node) -> bool:
    return x.op is Op.CONST and isinstance(x.arg, Constant) and x.arg.delta


def _eliminate_deltas(inputs: list[str], output: str, operands: list[Node], metric: set[str]):
    """delta_{ab} in a contraction: rename the summed letter to the other and drop the delta; a
    delta on one letter (delta_{aa}) is all ones on its diagonal and is dropped too. The merged
    letter identifies two bases, so it is recorded as a metric letter."""
    changed = True
    while changed:
        changed = False
        for k, (s, x) in enumerate(zip(inputs, operands)):
            if not _is_delta(x) or len(operands) == 1:
                continue
            a, b = s
            if a == b:
                if any(a in t for j, t in enumerate(inputs) if j != k) or a in output:
                    del inputs[k], operands[k]
                    changed = True
                    break
                continue
            drop, keep = (b, a) if b not in output else ((a, b) if a not in output else (None, None))
            if drop is None:
                continue
            del inputs[k], operands[k]
            inputs[:] = [t.replace(drop, keep) for t in inputs]
            metric.discard(drop)
            metric.add(keep)
            changed = True
            break


def einsum(inputs: Sequence[str], output: str, operands: Sequence[Node], metric=(),
           out_indices: Sequence[Index] | None = None, where=None) -> Node:
    inputs = list(inputs)
    if len(inputs) != len(operands):
        raise ValueError("einsum: one letter string per operand")
    if out_indices is None:  # each output letter takes the index of its first occurrence
        found: dict[str, Index] = {}
        for s, x in zip(inputs, operands):
            for ch, ix in zip(s, x.indices):
                found.setdefault(ch, ix)
        out_indices = tuple(found[ch] for ch in output)
    if any(_is_delta(x) for x in operands):
        operands, metric = list(operands), set(metric)
        _eliminate_deltas(inputs, output, operands, metric)
    metric = frozenset(metric) & frozenset("".join(inputs))
    if len(operands) == 1 and inputs[0] == output and not metric:
        return operands[0]
    # canonical letters (a, b, c, ... in order of first appearance): equal contractions written
    # with different dummy letters become one hash-consed node
    order = dict.fromkeys("".join(inputs) + output)
    if len(order) <= 52:
        canon = dict(zip(order, letters(len(order))))
        inputs = ["".join(canon[c] for c in t) for t in inputs]
        output = "".join(canon[c] for c in output)
        metric = frozenset(canon[c] for c in metric)
    return Node(Op.EINSUM, tuple(operands), Einsum(tuple(inputs), output, metric), tuple(out_indices), where)


def sum_dims(x: Node, dims: Sequence[int], where=None) -> Node:
    dims = tuple(sorted({d % x.ndim for d in dims})) if x.ndim else ()
    if not dims:
        return x
    kept = tuple(ix for k, ix in enumerate(x.indices) if k not in dims)
    return Node(Op.SUM, (x,), dims, kept, where)


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Runs (input axes, output axes) of equal size product, size-1 axes left out."""
    i = j = 0
    groups = []
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            j += 1
            continue
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                gi.append(i)
                i += 1
            else:
                pj *= dst[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape_indices(src: tuple[Index, ...], shape: tuple[int, ...]) -> tuple[Index, ...]:
    """A run of one input and one output axis keeps the index; merged or split axes get a
    product space; size-1 axes are unit indices."""
    out: list[Index] = [unit()] * len(shape)
    for gi, gj in reshape_groups([i.size for i in src], shape):
        group = [src[k] for k in gi]
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = group[0]
            continue
        var = {g.variance for g in group if g.space != UNIT}
        v = var.pop() if len(var) == 1 else Variance.BATCH
        space = "(" + "*".join(g.space for g in group) + ")"
        for k, jj in enumerate(gj):
            name = "".join(g.name for g in group) + (f"/{k}" if len(gj) > 1 else "")
            out[jj] = Index(name, shape[jj], space if len(gj) == 1 else f"{space}/{k}", v)
    return tuple(out)


def reshape(x: Node, shape: Sequence[int], indices: Sequence[Index] | None = None, where=None) -> Node:
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != math.prod(x.shape):
        raise ValueError(f"reshape {x.shape} -> {shape}: sizes differ")
    if shape == x.shape and (indices is None or tuple(indices) == x.indices):
        return x
    indices = tuple(indices) if indices is not None else _reshape_indices(x.indices, shape)
    return Node(Op.RESHAPE, (x,), shape, indices, where)


def unsqueeze(x: Node, dim: int) -> Node:
    dim = dim % (x.ndim + 1)
    idx = x.indices[:dim] + (unit(),) + x.indices[dim:]
    return reshape(x, [i.size for i in idx], idx)


def permute(x: Node, perm: Sequence[int], where=None) -> Node:
    perm = tuple(p % x.ndim for p in perm)
    if perm == tuple(range(x.ndim)):
        return x
    return Node(Op.PERMUTE, (x,), perm, tuple(x.indices[p] for p in perm), where)


def expand(x: Node, shape: Sequence[int], indices: Sequence[Index] | None = None, where=None) -> Node:
    shape = tuple(int(s) for s in shape)
    if shape == x.shape:
        return x
    if indices is None:
        pad = len(shape) - x.ndim
        indices = tuple(
            (x.indices[k - pad] if k >= pad and x.indices[k - pad].size == s
             else Index(f"e{k}", s, f"expand{s}", Variance.BATCH))
            for k, s in enumerate(shape)
        )
    return Node(Op.EXPAND, (x,), shape, tuple(indices), where)


def _resized(ix: Index, size: int, tag: str) -> Index:
    return Index(ix.name + tag, size, ix.space + tag, ix.variance)


def slice_(x: Node, dim: int, start: int, stop: int, step: int = 1, indices=None, where=None) -> Node:
    dim %= x.ndim
    n = x.shape[dim]
    start, stop, step = slice(start, stop, step).indices(n)
    if (start, stop, step) == (0, n, 1):
        return x
    size = len(range(start, stop, step))
    if indices is None:
        idx = list(x.indices)
        idx[dim] = _resized(idx[dim], size, f"[{start}:{stop}:{step}]")
        indices = tuple(idx)
    return Node(Op.SLICE, (x,), (dim, start, stop, step), tuple(indices), where)


def pad(x: Node, dim: int, start: int, step: int, size: int, index: Index) -> Node:
    idx = list(x.indices)
    idx[dim] = index
    return Node(Op.PAD, (x,), (dim, start, step, size), tuple(idx))


def index(x: Node, dim: int, idx: Sequence[int], indices=None, where=None) -> Node:
    dim %= x.ndim
    n = x.shape[dim]
    bad = [int(i) for i in idx if not -n <= int(i) < n]
    if bad:
        raise IndexError(f"index {bad[0]} is out of bounds for an axis of size {n}")
    idx = tuple(int(i) % n for i in idx)
    if indices is None:
        ii = list(x.indices)
        ii[dim] = _resized(ii[dim], len(idx), "[idx]")
        indices = tuple(ii)
    return Node(Op.INDEX, (x,), (dim, idx), tuple(indices), where)


def gather(x: Node, idx: Node, dim: int, indices=None, where=None) -> Node:
    """``out[p] = x[p with axis dim replaced by idx[p]]`` (idx: runtime integer indices, broadcast
    right-aligned against the result); ``dim`` counts from the right so leading batch axes of x
    (columns, tangents) leave it unchanged."""
    dim = dim - x.ndim if dim >= 0 else dim
    if indices is None:
        ii = list(x.indices)
        ii[dim] = _resized(ii[dim], idx.shape[dim], "[idx]")
        indices = tuple(ii)
    return Node(Op.GATHER, (x, idx), dim, tuple(indices), where)


def scatter_add(v: Node, idx: Node, dim: int, size: int, index_: Index) -> Node:
    """The transpose of :func:`gather`: zeros with axis ``dim`` of size ``size``, v added at idx."""
    ii = list(v.indices)
    ii[dim] = index_
    return Node(Op.SCATTER_ADD, (v, idx), (dim, size), tuple(ii))


def index_add(x: Node, dim: int, idx: tuple[int, ...], size: int, index_: Index) -> Node:
    ii = list(x.indices)
    ii[dim] = index_
    return Node(Op.INDEX_ADD, (x,), (dim, tuple(idx), size), tuple(ii))


def cat(xs: Sequence[Node], dim: int, indices=None, where=None) -> Node:
    xs = tuple(xs)
    if len(xs) == 1:
        return xs[0]
    dim %= xs[0].ndim
    if indices is None:
        ii = list(xs[0].indices)
        tot = sum(x.shape[dim] for x in xs)
        ii[dim] = Index(ii[dim].name + "+", tot, "cat(" + ",".join(x.indices[dim].space for x in xs) + ")",
                        ii[dim].variance)
        indices = tuple(ii)
    return Node(Op.CAT, xs, dim, tuple(indices), where)


def nondiff(fname: str, params: tuple, x: Node, *extra: Node, where=None) -> Node:
    """A piecewise-constant function of ``x`` (``hogc.ir.nondiff``): kept axes keep x's indices;
    ``extra`` sources are further runtime arguments (a random generator)."""
    from .nondiff import NONDIFF_FUNCTIONS

    fn = NONDIFF_FUNCTIONS[fname]
    shape = fn.shape(params, x.shape)
    kept = dict(fn.kept(params, x.ndim))
    indices = tuple(x.indices[kept[k]] if k in kept and x.shape[kept[k]] == d else
                    Index(f"{fname}.{k}", d, f"{fname}.{k}", Variance.UP) if d != 1 else unit()
                    for k, d in enumerate(shape))
    return Node(Op.NONDIFF, (x,) + tuple(extra), (fname, tuple(params)), indices, where)
