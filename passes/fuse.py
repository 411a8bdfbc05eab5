"""fuse_einsums: merge connected multilinear ops into one tensor network per consumer.

An EINSUM operand that is itself an EINSUM is inlined when it has no other user, or when
it is *expanding* (its result is larger than its operands, like the per-sample gradient
``g_{no} x_{ni} -> G_{noi}``): recomputing it inside the consumer is then cheaper than
materializing it. Sums of expanding einsums are distributed. With the path search
afterwards, ``sum_{oi} (g_{no} x_{ni})^2`` becomes ``(sum_o g^2)(sum_i x^2)`` on its own.
"""
from __future__ import annotations

import math

from hogc.ir import Node, Op, Program, build as B
from hogc.ir.node import Einsum

from .paths import _path, path_flops
from .selection import is_selection


__all__ = ["fuse_einsums", "MAX_TERMS"]

MAX_TERMS = 16  # cap on the number of einsums a distributed sum may produce
DISTRIBUTE_SLACK = 1.1  # a contracted sum is distributed when that costs at most 10% more FLOPs


def _expanding(p: Node) -> bool:
    return p.op is Op.EINSUM and math.prod(p.shape) > sum(math.prod(s.shape) for s in p.src)


def _inline(e: Node, k: int) -> Node:
    """Inline operand k (an EINSUM) of einsum e."""
    eq: Einsum = e.arg
    p = e.src[k]
    peq: Einsum = p.arg
    mapping = dict(zip(peq.output, eq.inputs[k]))
    used = "".join(eq.inputs) + eq.output
    inner = [ch for ch in dict.fromkeys("".join(peq.inputs)) if ch not in mapping]
    fresh = B.fresh_letters(used, len(inner))
    mapping.update(zip(inner, fresh))
    new_inputs = list(eq.inputs[:k]) + list(eq.inputs[k + 1:]) + ["".join(mapping[c] for c in s) for s in peq.inputs]
    new_src = list(e.src[:k]) + list(e.src[k + 1:]) + list(p.src)
    metric = eq.metric | {mapping[c] for c in peq.metric}
    # a hyperedge of the producer that the consumer sums becomes a sum over three or more operands:
    # a basis-dependent (diagonal) contraction, so it is marked like a metric one
    counts: dict[str, int] = {}
    for term, x in zip(new_inputs, new_src):
        for ch, ix in zip(term, x.indices):
            if not ix.is_batch:
                counts[ch] = counts.get(ch, 0) + 1
    metric |= {ch for ch, k in counts.items() if k > 2 and ch not in eq.output}
    return B.einsum(new_inputs, eq.output, new_src, metric=metric, out_indices=e.indices)


def _distribute(e: Node, k: int) -> list[Node]:
    """einsum(..., a + b, ...) -> [einsum(..., a, ...), einsum(..., b, ...)] (signs kept)."""
    terms = _terms(e.src[k])
    out = []
    for sign, t in terms:
        src = list(e.src)
        src[k] = t
        r = B.einsum(e.arg.inputs, e.arg.output, src, metric=e.arg.metric, out_indices=e.indices)
        out.append((sign, r))
    return out


def _terms(n: Node) -> list[tuple[float, Node]]:
    """The signed summands of a tree of same-shape ADD/SUB nodes, left to right (iterative: long
    accumulation chains must not hit Python's recursion limit)."""
    out, stack = [], [(1.0, n)]
    while stack:
        sign, m = stack.pop()
        if m.op in (Op.ADD, Op.SUB) and m.src[0].shape == m.src[1].shape == m.shape:
            stack.append((-sign if m.op is Op.SUB else sign, m.src[1]))
            stack.append((sign, m.src[0]))
        else:
            out.append((sign, m))
    return out


def _patterned(e: Node) -> bool:
    """Does the einsum hold an index pattern (a convolution's or pooling's 0/1 selection)? Two
    such networks stay apart: each is a kernel call or a gather on its own, merged they are a
    product of patterns that neither kernel nor gather covers."""
    return any(x.ndim >= 2 and is_selection(x) for x in e.src)


def _network_flops(e: Node) -> int:
    if e.op is not Op.EINSUM or len(e.src) < 2:
        return math.prod(e.shape) if e.op is Op.EINSUM else 0
    shapes = tuple(x.shape for x in e.src)
    return path_flops(e.arg, shapes, _path(e.arg, shapes, "auto"))


def _distributed_if_cheap(e: Node, k: int, terms, uses: dict[int, int]) -> list | None:
    """A sum of einsums used only by ``e``, which contracts it: distributing ``e`` over the terms
    lets each fuse with its term (``<sum_n a_n b_n^T, U> = sum_n <a_n, U b_n>``, where ``U b`` may
    be shared with other networks). The distributed terms when the fused terms cost at most
    ``DISTRIBUTE_SLACK`` times the sum and ``e`` (the FLOP count misses the sum's memory traffic
    and the sharing), else None."""
    p = e.src[k]
    if uses.get(p.uid, 0) > 1 or not all(t.op is Op.EINSUM for _, t in terms) or math.prod(e.shape) >= math.prod(p.shape):
        return None
    apart = _network_flops(e) + sum(_network_flops(t) + math.prod(p.shape) for _, t in terms)
    distributed = _distribute(e, k)
    fused = sum(_network_flops(_inline(r, k)) for _, r in distributed)
    return distributed if fused <= DISTRIBUTE_SLACK * apart else None


def _merge_squares(e: Node) -> Node:
    """``x_L x_L`` inside an einsum is ``(x*x)_L``: identical operand pairs become one squared
    operand, so a squared product of factors is a product of squared factors
    (``(q W s)^2 = q^2 W^2 s^2``) and the path search sees the cheap form."""
    eq: Einsum = e.arg
    seen: dict[tuple[int, str], int] = {}
    for k, (s, x) in enumerate(zip(eq.inputs, e.src)):
        key = (x.uid, s)
        if key in seen and len(e.src) > 2:
            j = seen[key]
            inputs = [t for i, t in enumerate(eq.inputs) if i != k]
            src = [y for i, y in enumerate(e.src) if i != k]
            src[j] = B.mul(x, x)
            return _merge_squares(B.einsum(inputs, eq.output, src, metric=eq.metric, out_indices=e.indices))
        seen[key] = k
    return e


def _fuse(e: Node, uses: dict[int, int], merge_squares: bool = True) -> Node:
    """Fuse einsum ``e`` with its producers; may return a sum of einsums."""
    pending = [(1.0, e)]
    done: list[tuple[float, Node]] = []
    while pending:
        sign, cur = pending.pop()
        if cur.op is not Op.EINSUM:
            done.append((sign, cur))
            continue
        patterned = _patterned(cur)
        for k, p in enumerate(cur.src):
            if p.op is Op.EINSUM and (uses.get(p.uid, 0) <= 1 or _expanding(p)) and \
                    not (patterned and _patterned(p)):
                pending.append((sign, _inline(cur, k)))
                break
            terms = _terms(p)
            if len(terms) > 1 and len(pending) + len(done) + len(terms) <= MAX_TERMS:
                distributed = _distribute(cur, k) if all(_expanding(t) for _, t in terms) else \
                    _distributed_if_cheap(cur, k, terms, uses)
                if distributed is not None:
                    pending.extend((sign * s, t) for s, t in distributed)
                    break
        else:
            done.append((sign, _merge_squares(cur) if cur.op is Op.EINSUM and merge_squares else cur))
    total = None
    for sign, t in done:
        if total is None:
            total = t if sign > 0 else B.scale(t, -1.0)
        else:
            total = B.add(total, t) if sign > 0 else B.sub(total, t)
    return total


def fuse_einsums(program: Program, merge_squares: bool = True) -> Program:
    """Merge einsum producers into their einsum consumers (see the module docstring).

    Args:
        program: any program; nodes other than EINSUM (and sums of expanding einsums) are kept.
        merge_squares: turn identical operand pairs into squared operands (off for the 'naive'
            schedule, which contracts exactly what the passes wrote).

    Returns:
        An equivalent program whose einsums are tensor networks over the original operands.
    """
    uses = program.use_counts()
    new: dict[int, Node] = {}
    for node in program.nodes:
        src = tuple(new[s.uid] for s in node.src)
        n2 = node if src == node.src else node.replace(src=src)
        if n2 is not node:
            uses[n2.uid] = uses.get(node.uid, 0)
        if n2.op is Op.EINSUM:
            n2 = _fuse(n2, uses, merge_squares)
            uses[n2.uid] = uses.get(node.uid, 0)
        new[node.uid] = n2
    return Program.of({k: new[v.uid] for k, v in program.outputs.items()})
