"""block_squares: sums of squares of a large product, computed one cache-sized block at a time.

Per-sample gradients and GGN columns are squared and summed (``sum_{c,n} V^2`` for ``ggn_diag``,
``sum_n P^2`` for ``sum_grad_squared``, ``sum_{params} P^2`` per sample for ``batch_l2``). When
``V = A . B`` is one pairwise contraction used only by its square, building all of V before
squaring it makes both steps memory-bound: on 3c3d's third convolution V has 35M elements, and
the product plus the square took 136 ms where a loop over samples took 30 ms, each block still
in cache when it is squared. This pass cuts such a square along one batch letter of V (samples
first, a letter both factors carry) into blocks of at most ``BLOCK_BYTES``: each block is its
own product and square, summed blocks accumulate in place, kept ones concatenate.
"""
from __future__ import annotations

import dataclasses
import math

from hogc.ir import Node, Op, Program, SAMPLE, build as B
from hogc.ir.node import Einsum

__all__ = ["block_squares", "squared_product", "BLOCK_BYTES"]

#: Largest block of the squared product (bytes): within a last-level cache.
BLOCK_BYTES = 8 * 2**20


def squared_product(node: Node, uses: dict[int, int]) -> Node | None:
    """The product V when ``node`` is ``sum V^2`` of a pairwise product V read by nothing else."""
    if node.op is not Op.EINSUM or len(node.src) != 2 or node.src[0] is not node.src[1]:
        return None
    eq: Einsum = node.arg
    V = node.src[0]
    if eq.inputs[0] != eq.inputs[1] or V.op is not Op.EINSUM or len(V.src) != 2 or uses.get(V.uid) != 2:
        return None
    return V


def _square_of_product(node: Node, uses: dict[int, int], itemsize: int) -> tuple[Node, int, int] | None:
    """(V, axis of V to cut, block size) when ``node`` sums squares of a large product V."""
    V = squared_product(node, uses)
    if V is None:
        return None
    size = math.prod(V.shape) * itemsize
    if size <= BLOCK_BYTES:
        return None
    ve: Einsum = V.arg

    def rank(k: int):
        letter = ve.output[k]
        return (V.indices[k].space == SAMPLE, sum(letter in s for s in ve.inputs), V.shape[k])

    axes = [k for k in range(V.ndim) if V.indices[k].is_batch and V.shape[k] > 1]
    if not axes:
        return None
    k = max(axes, key=rank)
    block = max(1, BLOCK_BYTES // (size // V.shape[k]))
    return (V, k, block) if block < V.shape[k] else None


def _blocked(node: Node, V: Node, k: int, block: int) -> Node:
    eq, ve = node.arg, V.arg
    letter = ve.output[k]
    # each block in the product's natural layout (shared letters, then the first factor's, then the
    # second's: a batched GEMM writes it contiguously); the square reads it in that order
    a, b = ve.inputs
    order = sorted(range(V.ndim), key=lambda j: 0 if ve.output[j] in a and ve.output[j] in b else
                   1 if ve.output[j] in a else 2)
    vout = "".join(ve.output[j] for j in order)
    sq = "".join(eq.inputs[0][j] for j in order)
    parts = []
    for lo in range(0, V.shape[k], block):
        hi = min(lo + block, V.shape[k])
        ops = [B.slice_(x, s.index(letter), lo, hi) if letter in s else x for s, x in zip(ve.inputs, V.src)]
        vk = B.einsum(list(ve.inputs), vout, ops, metric=ve.metric)
        parts.append(B.einsum([sq, sq], eq.output, [vk, vk], metric=eq.metric))
    kept = eq.inputs[0][k]
    if kept in eq.output:  # a letter of the result (batch_l2's samples): blocks side by side
        return B.cat(parts, eq.output.index(kept), indices=node.indices)
    total = parts[0]
    for p in parts[1:]:
        total = B.add(total, p)
    return B.einsum([eq.output], eq.output, [total], out_indices=node.indices) if total.indices != node.indices \
        else total


def block_squares(program: Program, itemsize: int = 4) -> Program:
    """Cut every sum of squares of a product larger than ``BLOCK_BYTES`` into blocks (see module)."""
    uses = program.use_counts()
    new: dict[int, Node] = {}
    cut: dict[int, tuple[str, int]] = {}  # node -> (the cut letter's index name, blocks)
    for node in program.nodes:
        src = tuple(new[s.uid] for s in node.src)
        found = _square_of_product(node, uses, itemsize) if src == node.src else None
        if found is not None:
            V, k, block = found
            new[node.uid] = _blocked(node, V, k, block)
            cut[node.uid] = (V.indices[k].name, -(-V.shape[k] // block))
        else:
            new[node.uid] = node if src == node.src else node.replace(src=src)
    if not cut:
        return program
    nets = []
    for n, rec in program.networks:
        if n.uid in cut:
            name, blocks = cut[n.uid]
            rec = dataclasses.replace(rec, sliced=rec.sliced + (f"{name}/{blocks} (blocks)",), slices=rec.slices * blocks)
        nets.append((new.get(n.uid, n), rec))
    return Program.of({key: new[v.uid] for key, v in program.outputs.items()}).with_networks(nets)
