"""``fn.explain()``: what a compiled program does — the strategy each quantity chose and why,
every tensor network with its schedule (equation with index variances, path, FLOPs, largest
intermediate, slicing), every emitted contraction, and the predicted peak memory."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .emit.memory import predicted_peak
from .ir import Einsum, Op, Program
from .ir.index import fmt_indices
from .passes.paths import einsum_flops, letter_sizes

__all__ = ["Explanation", "Contraction", "Network", "explain"]


@dataclass(frozen=True)
class Contraction:
    """One emitted (pairwise or single-operand) einsum."""

    node: str  # "%k" as in fn.ir
    equation: str
    indices: str  # the result's indices with their variance
    flops: int  # multiply-adds counted as 2
    size: int  # elements of the result


@dataclass(frozen=True)
class Network:
    """One tensor network as the schedule contracts it."""

    node: str  # "%k" of its result in fn.ir
    equation: str
    legend: str  # each letter's index with its variance (^ upper, _ lower, . sample/batch)
    path: tuple[tuple[int, int], ...]
    flops: int  # all slices together
    largest: int  # elements of the largest intermediate (one slice)
    largest_bytes: int
    sliced: tuple[str, ...]  # "letter/chunks"
    slices: int


@dataclass(frozen=True)
class Explanation:
    strategies: dict[str, str]
    contractions: tuple[Contraction, ...]
    networks: tuple[Network, ...] = ()
    optimize: str = "auto"
    memory_budget: int | None = None
    predicted_peak: int = 0  # bytes the program allocates at its peak (liveness analysis)
    output_bytes: int = 0

    @property
    def total_flops(self) -> int:
        return sum(c.flops for c in self.contractions)

    @property
    def largest(self) -> Contraction | None:
        return max(self.contractions, key=lambda c: c.size, default=None)

    @property
    def largest_intermediate(self) -> int:
        """Bytes of the largest network intermediate (one slice)."""
        return max((n.largest_bytes for n in self.networks), default=0)

    def __str__(self) -> str:
        lines = []
        if self.strategies:
            lines.append("strategies:")
            lines += [f"  {q}: {why}" for q, why in self.strategies.items()]
        budget = "none" if self.memory_budget is None else _bytes(self.memory_budget)
        lines.append(f"networks ({len(self.networks)}; optimize={self.optimize!r}, memory_budget={budget}):")
        lines.append(f"  {'node':>6}  {'equation':<30} {'FLOPs':>9} {'largest':>9} {'slices':>6}  "
                     f"{'sliced':<10} path")
        for n in self.networks:
            path = " ".join(f"{a}{b}" for a, b in n.path) if len(n.path) > 1 else "-"
            lines.append(f"  {n.node:>6}  {n.equation:<30} {n.flops:>9.3g} {_bytes(n.largest_bytes):>9} "
                         f"{n.slices:>6}  {' '.join(n.sliced) or '-':<10} {path}")
            lines.append(f"  {'':>6}    {n.legend}")
        lines.append(f"contractions emitted: {len(self.contractions)}, {self.total_flops:.3g} FLOPs in total")
        for c in self.contractions:
            lines.append(f"  {c.node:>6}  {c.equation:<28} {c.flops:>10.3g} {c.size:>10}  {c.indices}")
        if self.largest is not None:
            lines.append(f"largest contraction result: {self.largest.node} with {self.largest.size} elements")
        lines.append(f"predicted peak memory: {_bytes(self.predicted_peak)} (results {_bytes(self.output_bytes)})")
        return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def explain(program: Program, strategies: dict[str, str] | None = None, itemsize: int = 4,
            optimize: str = "auto", memory_budget: int | None = None) -> Explanation:
    pos = {id(n): k for k, n in enumerate(program.nodes)}
    out = []
    for k, node in enumerate(program.nodes):
        if node.op is Op.SQUARE_PRODUCT:
            product, square, why = node.arg
            work = math.prod(letter_sizes(product.inputs, (x.shape for x in node.src)).values())
            out.append(Contraction(f"%{k}", f"sum ({product})^2 -> {square.output}  [fused kernel: {why}]",
                                   fmt_indices(node.indices), 2 * work + math.prod(node.shape), math.prod(node.shape)))
            continue
        if node.op is not Op.EINSUM:
            continue
        eq: Einsum = node.arg
        out.append(Contraction(f"%{k}", str(eq), fmt_indices(node.indices), einsum_flops(node),
                               math.prod(node.shape)))
    nets = []
    for node, rec in program.networks:
        if id(node) not in pos or (rec.operands <= 2 and rec.slices == 1):
            continue  # folded away by a later rewrite, or a plain pairwise contraction (listed below)
        nets.append(Network(f"%{pos[id(node)]}", rec.equation, rec.legend, rec.path, rec.flops, rec.largest,
                            rec.largest * rec.itemsize, rec.sliced, rec.slices))
    est = predicted_peak(program, itemsize)
    return Explanation(dict(strategies or {}), tuple(out), tuple(nets), optimize, memory_budget, est.peak,
                       est.outputs)
