"""The memory model of emitted code: a liveness analysis of a program in emission order.

Every node that allocates holds ``numel * itemsize`` bytes from its emission until its last
reader ran (the emitted code drops references right after their last use); views (reshape,
permute, expand, slice, windows) and in-place accumulations alias their source and keep it
alive; a reshape of a permuted, expanded or windowed view to a new shape is a copy. An einsum emitted as broadcast
multiply-and-sum also holds its full product for the duration of the node, a matrix product
the operand copies its flattening needs (``fx.einsum_transient``), and an elementwise
derivative the temporaries of its expression (``elementwise.temporaries``), a fused square
kernel its per-tile partial sums and operand copies (``square_kernel.square_transient``). Inputs (parameters,
data) are the caller's and are not counted; outputs live to the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hogc.ir import Op, Program
from hogc.passes import elementwise as E

from .fx import accumulators, einsum_transient, reshape_copies
from .square_kernel import square_transient

__all__ = ["MemoryEstimate", "predicted_peak", "VIEW_OPS"]

VIEW_OPS = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.WINDOWS})
_FREE = frozenset({Op.INPUT, Op.CONST})


@dataclass(frozen=True)
class MemoryEstimate:
    peak: int  # bytes allocated by the program at its peak
    at: int  # position in program.nodes where the peak happens
    outputs: int  # bytes of the results


def predicted_peak(program: Program, itemsize: int = 4) -> MemoryEstimate:
    """Peak of live bytes over the emitted program (see the module docstring)."""
    nodes = program.nodes
    inplace = accumulators(program)
    base: dict[int, int] = {}
    last: dict[int, int] = {}
    size: dict[int, int] = {}
    for k, n in enumerate(nodes):
        copies = n.op is Op.RESHAPE and reshape_copies(n)
        alias = (n.op in VIEW_OPS and not copies) or n.uid in inplace
        base[n.uid] = base[n.src[0].uid] if alias else n.uid
        size[n.uid] = 0 if n.op in _FREE or alias else math.prod(n.shape) * itemsize
        for s in n.src:
            last[base[s.uid]] = k
    end = len(nodes)
    for out in program.outputs.values():
        last[base[out.uid]] = end
    outputs = sum(size[base[o.uid]] for o in {id(o): o for o in program.outputs.values()}.values())
    live, peak, at = 0, 0, 0
    dying: dict[int, int] = {}
    for k, n in enumerate(nodes):
        live += size[n.uid]
        transient = 0
        if n.op is Op.EINSUM:
            transient = einsum_transient(n) * itemsize
        elif n.op is Op.ELEMENTWISE:
            transient = E.temporaries(n.arg[0], n.arg[1]) * size[n.uid]
        elif n.op is Op.SQUARE_PRODUCT:
            transient = square_transient(n) * itemsize
        if live + transient > peak:
            peak, at = live + transient, k
        if size[n.uid] and last.get(n.uid, k) <= k:  # never read: dropped at once
            dying[n.uid] = k
        for s in n.src:
            b = base[s.uid]
            if last.get(b) == k:
                dying[b] = k
        for b in [b for b, t in dying.items() if t == k]:
            live -= size[b]
            del dying[b]
    return MemoryEstimate(peak, at, outputs)
