"""``fn.explain()``: what a compiled program does — the strategy each quantity chose and why,
and every contraction with its FLOPs and result size."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ir import Einsum, Op, Program
from .ir.index import fmt_indices

__all__ = ["Explanation", "Contraction", "explain"]


@dataclass(frozen=True)
class Contraction:
    node: str  # "%k" as in fn.ir
    equation: str
    indices: str  # the result's indices with their variance
    flops: int  # multiply-adds counted as 2
    size: int  # elements of the result


@dataclass(frozen=True)
class Explanation:
    strategies: dict[str, str]
    contractions: tuple[Contraction, ...]

    @property
    def total_flops(self) -> int:
        return sum(c.flops for c in self.contractions)

    @property
    def largest(self) -> Contraction | None:
        return max(self.contractions, key=lambda c: c.size, default=None)

    def __str__(self) -> str:
        lines = []
        if self.strategies:
            lines.append("strategies:")
            lines += [f"  {q}: {why}" for q, why in self.strategies.items()]
        lines.append(f"contractions ({len(self.contractions)}, {self.total_flops:.3g} FLOPs in total):")
        lines.append(f"  {'node':>6}  {'equation':<28} {'FLOPs':>10} {'result':>10}  indices")
        for c in self.contractions:
            lines.append(f"  {c.node:>6}  {c.equation:<28} {c.flops:>10.3g} {c.size:>10}  {c.indices}")
        if self.largest is not None:
            lines.append(f"largest result: {self.largest.node} with {self.largest.size} elements")
        return "\n".join(lines)


def explain(program: Program, strategies: dict[str, str] | None = None) -> Explanation:
    out = []
    for k, node in enumerate(program.nodes):
        if node.op is not Op.EINSUM:
            continue
        eq: Einsum = node.arg
        sizes: dict[str, int] = {}
        for s, x in zip(eq.inputs, node.src):
            sizes.update(zip(s, x.shape))
        work = math.prod(sizes.values())
        flops = work if len(node.src) == 1 else 2 * work
        out.append(Contraction(f"%{k}", str(eq), fmt_indices(node.indices), flops, math.prod(node.shape)))
    return Explanation(dict(strategies or {}), tuple(out))
