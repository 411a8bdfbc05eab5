"""Selection constants: 0/1 tensors that map index tuples to index tuples (the index patterns of
convolutions and pooling, one-hot placements). A pairwise contraction with one is a gather or a
scatter-add, not a product: it moves ``numel`` elements instead of multiplying through the
pattern's dense shape. ``contract_pairwise`` costs such steps as memory traffic when it searches
a path and builds them with INDEX / INDEX_ADD.

For a step ``X[..., G] P[G, O] -> R[..., O]`` (G: the letters summed with X, O: P's letters in
the result):

* gather: every O-tuple has at most one G-tuple with P = 1: ``R = X[..., idx(O)]``, zero where none;
* scatter: every G-tuple has at most one O-tuple: ``R[..., o(G)] += X[..., G]``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from hogc.ir import Index, Node, Op, Variance, build as B
from hogc.ir.node import Constant

__all__ = ["selection_kind", "selection_step", "is_selection"]

_SEL = "selection"


def is_selection(node: Node) -> bool:
    return _table(node) is not None


def _table(node: Node):
    if node.op is not Op.CONST or not isinstance(node.arg, Constant) or node.ndim == 0:
        return None
    return _cached_table(node.arg)


@lru_cache(maxsize=1024)
def _cached_table(c: Constant):
    t = c.tensor
    if t.numel() > 1 << 22 or not bool(((t == 0) | (t == 1)).all()):
        return None
    return t.detach().to("cpu").bool()


def _split(sx: str, sp: str, out: str):
    """(G, O) letters of P, or None when P shares a letter with both X and the result (a hyperedge)
    or has a letter in neither (a private sum)."""
    G = [c for c in sp if c in sx and c not in out]
    O = [c for c in sp if c in out and c not in sx]
    if len(G) + len(O) != len(sp) or not G or not O:
        return None
    return G, O


def selection_kind(sx: str, sp: str, out: str, p: Node) -> str | None:
    """'gather', 'scatter' or None for the pairwise step X (letters sx) with P (sp) -> out."""
    t = _table(p)
    if t is None:
        return None
    split = _split(sx, sp, out)
    if split is None:
        return None
    G, O = split
    m = _matrix(p, sp, tuple(G), tuple(O))
    if bool((m.sum(0) <= 1).all()):
        return "gather"
    if bool((m.sum(1) <= 1).all()):
        return "scatter"
    return None


def _matrix(p: Node, sp: str, G: tuple, O: tuple) -> torch.Tensor:
    """P as a (prod G, prod O) 0/1 matrix."""
    t = _table(p)
    perm = [sp.index(c) for c in G + O]
    g = math.prod(t.shape[sp.index(c)] for c in G)
    return t.permute(perm).reshape(g, -1)


def _merged(n: int, tag: str) -> Index:
    return Index(f"{_SEL}{tag}", n, _SEL, Variance.BATCH)


#: col2im as K placed slices costs K zero-filled full-size buffers; one index_add is cheaper on
#: CPU (measured on 3c3d's ggn_diag: 3 fills + 2 adds of (10, 32, 64, 14, 3, 30) per pooling)
SCATTER_BY_SLICES = False


def _strided(sx: str, sp: str, out: str, x: Node, p: Node, kind: str, out_indices) -> Node | None:
    """A convolution pattern P[h, t, o] = [h == o s + t d - pad] (``Constant.pattern``) as strided
    views: gather = pad, then the windows of step s as one strided view (im2col without index
    lists or copies); scatter (off by default) = each tap's slice placed back with step s and summed."""
    pat = p.arg.pattern if isinstance(p.arg, Constant) else None
    if pat is None or len(sp) != 3:
        return None
    stride, pad, dil = pat
    h, t, o = sp
    S, K, O = p.shape
    need = (O - 1) * stride + (K - 1) * dil + 1  # padded length the windows span
    total = max(S + 2 * pad, need)
    if kind == "gather" and h in sx and t in out and o in out:
        ax = sx.index(h)
        xp = B.pad(x, ax, pad, 1, total, _merged(total, "p")) if total != S else x
        stacked = Node(Op.WINDOWS, (xp,), (ax, K, dil, O, stride),
                       xp.indices[:ax] + (_merged(K, "t"), _merged(O, "o")) + xp.indices[ax + 1:])
        letters = sx[:ax] + t + o + sx[ax + 1:]
    elif kind == "gather" and o in sx and t in out and h in out and (K - 1) * dil >= pad:
        # the transposed direction, R[.., h, t] = X[.., (h + pad - t d) / s] (zero where not whole):
        # X spread with step s after (K - 1) d - pad zeros, its windows, taps reversed (one copy)
        ax = sx.index(o)
        span = S + (K - 1) * dil
        xp = B.pad(x, ax, (K - 1) * dil - pad, stride, span, _merged(span, "p"))
        win = Node(Op.WINDOWS, (xp,), (ax, K, dil, S, 1),
                   xp.indices[:ax] + (_merged(K, "t"), _merged(S, "h")) + xp.indices[ax + 1:])
        stacked = B.index(win, ax, tuple(range(K - 1, -1, -1)), indices=win.indices)
        letters = sx[:ax] + t + h + sx[ax + 1:]
    elif kind == "scatter" and t in sx and o in sx and h in out and SCATTER_BY_SLICES:
        at, ao = sx.index(t), sx.index(o)
        rest = [c for c in sx if c not in (t, o)]
        xs = B.permute(x, [sx.index(c) for c in rest] + [at, ao])
        d = len(rest)
        lead = xs.indices[:d]
        placed = None
        for k in range(K):
            sl = B.reshape(B.slice_(xs, d, k, k + 1), xs.shape[:d] + (O,), lead + (_merged(O, "o"),))
            pd = B.pad(sl, d, k * dil, stride, total, _merged(total, "p"))
            placed = pd if placed is None else B.add(placed, pd)
        stacked = B.slice_(placed, d, pad, pad + S, 1, indices=lead + (_merged(S, "h"),))
        letters = "".join(rest) + h
    else:
        return None
    result = B.permute(stacked, [letters.index(c) for c in out])
    return B.reshape(result, result.shape, tuple(out_indices))


def selection_step(sx: str, sp: str, out: str, x: Node, p: Node, kind: str, out_indices) -> Node:
    """The pairwise step as a gather or scatter-add, result letters ``out`` with ``out_indices``."""
    strided = _strided(sx, sp, out, x, p, kind, out_indices)
    if strided is not None:
        return strided
    G, O = _split(sx, sp, out)
    m = _matrix(p, sp, tuple(G), tuple(O))
    rest = [c for c in sx if c not in G]
    xs = B.permute(x, [sx.index(c) for c in rest + G])
    lead = tuple(x.shape[sx.index(c)] for c in rest)
    ng, no = m.shape
    flat = B.reshape(xs, lead + (ng,), tuple(_merged(s, str(k)) for k, s in enumerate(lead)) + (_merged(ng, "g"),))
    d = len(rest)
    if kind == "gather":
        has = m.any(0)
        src = torch.where(has, m.float().argmax(0), torch.full((no,), ng))
        padded = B.pad(flat, d, 0, 1, ng + 1, _merged(ng + 1, "g"))
        moved = B.index(padded, d, tuple(int(i) for i in src), indices=flat.indices[:d] + (_merged(no, "o"),))
    else:
        has = m.any(1)
        dst = torch.where(has, m.float().argmax(1), torch.full((ng,), no))
        summed = B.index_add(flat, d, tuple(int(i) for i in dst), no + 1, _merged(no + 1, "o"))
        moved = B.slice_(summed, d, 0, no, 1, indices=flat.indices[:d] + (_merged(no, "o"),))
    o_sizes = tuple(p.shape[sp.index(c)] for c in O)
    letters = rest + O
    shaped = B.reshape(moved, lead + o_sizes, tuple(_merged(s, str(k)) for k, s in enumerate(lead + o_sizes)))
    perm = [letters.index(c) for c in out]
    result = B.permute(shaped, perm)
    return B.reshape(result, result.shape, tuple(out_indices))
