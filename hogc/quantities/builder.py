"""The derivative builder every quantity draws on, and ``derive`` (forward -> derivative program).

Every derivative quantity is a contraction of reverse- or forward-mode results:

* ``P[θ]_{n...}``: per-sample gradients (backpropagating ``dL/df``),
* ``V[θ]_{cn...}``: per-sample Jacobian-transposed columns of the loss-Hessian square root
  (backpropagating ``S`` with one more batch index ``c``), exact or Monte-Carlo,
* tangents of the gradients (forward-over-reverse) for Hessian quantities.

The optimization passes then turn e.g. ``sum_{c,n} V^2`` into BackPACK's formulas.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property

import torch

from hogc.passes.backpropagate import backpropagate
from hogc.passes.conv import pattern_of
from hogc.passes.vjp_rules import cot_indices

from ..capture.losses import num_columns
from ..ir import COLUMN, Index, LossSpec, Node, Op, Program, Variance, build as B, dual, topological_order
from .registry import get_quantity

__all__ = ["DerivativeBuilder", "derive", "square_sum", "sum_parts"]


class DerivativeBuilder:
    """Builds (and shares, via hash-consing) the derivative graphs quantities need."""

    def __init__(self, output: Node, target: Node, params: dict[str, Node], spec: LossSpec, dtype: torch.dtype,
                 rng: Node | None = None, mc_samples: int = 1, top_k: int = 1):
        self.output, self.target, self.params, self.spec, self.dtype = output, target, params, spec, dtype
        self.rng, self.mc_samples, self.top_k = rng, mc_samples, top_k
        self.partition: list[list[str]] | None = None  # subsets of parameter names (partition quantities)
        self.direction_given = False  # partition direction: INPUTs of role 'direction' (else the gradient)
        self.partition_strategy = "auto"  # 'dense', 'unrolled' or 'auto' (by device_type)
        self.kfac_approx: str | None = None  # Kronecker factors over shared positions: expand or reduce
        self.device_type = "cpu"  # where the program will run
        #: quantities that sum over the square-root columns run one backward pass per chunk of
        #: columns (a memory budget asks for it: the columns' cotangents dominate the peak)
        self.column_chunks = 1
        self.N = output.shape[output.sample_axis()]
        self.sample = output.indices[output.sample_axis()]
        self.notes: dict[str, str] = {}  # quantity -> the strategy chosen and why (fn.explain())

    @cached_property
    def loss(self) -> Node:
        return Node(Op.LOSS, (self.output, self.target), self.spec, ())

    def _backprop(self, seed: Node, lead: tuple[Index, ...]) -> dict[str, Node]:
        """Per-sample cotangents of every parameter; explicit zeros where the loss does not depend on one."""
        cots = backpropagate(self.output, seed, lead, self.params)
        for name, p in self.params.items():
            if name not in cots:
                layout = cot_indices(p, lead, self.sample)
                cots[name] = B.const_tensor(torch.zeros([i.size for i in layout], dtype=self.dtype), layout)
        return {name: cots[name] for name in self.params}

    def _column_backprop(self, seed: Node) -> dict[str, Node]:
        """Per-sample cotangents of every parameter for each column of ``seed`` (columns first)."""
        return self._backprop(seed, seed.indices[:1])

    def grad_cotangents(self, nodes: dict[str, Node]) -> dict[str, Node]:
        """Per-sample gradient cotangents of intermediate ``nodes`` (shared with per_sample_grads)."""
        seed = Node(Op.LOSS_GRAD, (self.output, self.target), self.spec, dual(self.output.indices))
        cots = backpropagate(self.output, seed, (), self.params, also=nodes)
        return {k: cots[k] for k in nodes if k in cots}

    @cached_property
    def per_sample_grads(self) -> dict[str, Node]:
        seed = Node(Op.LOSS_GRAD, (self.output, self.target), self.spec, dual(self.output.indices))
        return self._backprop(seed, ())

    def column_seed(self, mc: bool, full: bool = False) -> Node:
        """The loss-Hessian square root S at the output, columns first: exact (c) or Monte-Carlo (m).
        The exact one has the Hessian's rank of columns (cross-entropy: C - 1), or BackPACK's C
        with ``full``."""
        if mc:
            c = Index("m", self.mc_samples, COLUMN, Variance.BATCH)
            return Node(Op.LOSS_SQRT_HESSIAN_MC, (self.output, self.target, self.rng), (self.spec, self.mc_samples),
                        (c,) + dual(self.output.indices))
        c = Index("c", num_columns(self.spec, self.output.shape, full), COLUMN, Variance.BATCH)
        return Node(Op.LOSS_SQRT_HESSIAN, (self.output, self.target), self.spec, (c,) + dual(self.output.indices))

    def _seeds(self, mc: bool) -> list[Node]:
        """The column seed, or its ``column_chunks`` slices along the columns (one backward pass each)."""
        seed = self.column_seed(mc)
        C = seed.shape[0]
        k = max(1, min(self.column_chunks, C))
        cuts = [C * j // k for j in range(k + 1)]
        return [B.slice_(seed, 0, lo, hi) for lo, hi in zip(cuts, cuts[1:])]

    @cached_property
    def sqrt_ggn(self) -> dict[str, Node]:
        return self._column_backprop(self.column_seed(False))

    @cached_property
    def sqrt_ggn_full(self) -> dict[str, Node]:
        """``sqrt_ggn`` with BackPACK's C columns for cross-entropy (the ``sqrt_ggn`` quantity)."""
        return self._column_backprop(self.column_seed(False, full=True))

    @cached_property
    def sqrt_ggn_mc(self) -> dict[str, Node]:
        return self._column_backprop(self.column_seed(True))

    def sqrt_ggn_parts(self, mc: bool) -> list[dict[str, Node]]:
        """``sqrt_ggn`` (or ``sqrt_ggn_mc``) as one part per column chunk: quantities that sum over
        the columns sum their parts with ``sum_parts``."""
        return [self._column_backprop(s) for s in self._seeds(mc)]

    def column_cotangents(self, mc: bool, nodes: dict[str, Node]) -> list[dict[str, Node]]:
        """Cotangents of intermediate ``nodes`` in the exact (or Monte-Carlo) square-root backward
        pass, one dict per column chunk; the pass itself is shared with ``sqrt_ggn`` through
        hash-consing."""
        parts = []
        for seed in self._seeds(mc):
            cots = backpropagate(self.output, seed, seed.indices[:1], self.params, also=nodes)
            parts.append({k: cots[k] for k in nodes if k in cots})
        return parts

    @cached_property
    def _forward_uses(self) -> tuple[tuple[Node, ...], dict[int, int], dict[int, str]]:
        """The forward graph in topological order, each node's number of uses, parameter names by uid."""
        order = topological_order([self.output])
        uses: dict[int, int] = {}
        for n in order:
            for src in n.src:
                uses[src.uid] = uses.get(src.uid, 0) + 1
        return order, uses, {p.uid: k for k, p in self.params.items()}

    @cached_property
    def linear_maps(self) -> dict[str, tuple[str, Node, Node | None]]:
        """Parameters used once in a linear map ``z_{n...o} = W_{oi} x_{n...i} (+ b_o)`` (``F.linear``,
        or ``x @ W.T``; ``...`` are positions the weight is shared over, as in a sequence): name ->
        ("weight", z, x) or ("bias", z + b, None). A bias factor uses the cotangent of ``z + b``
        itself: ``z`` may have other uses."""
        order, uses, names = self._forward_uses

        def weight(w: Node, sw: str) -> tuple[Node, str] | None:
            """The parameter behind operand w, with its letters in (out, in) order."""
            if w.op is Op.PERMUTE and w.arg == (1, 0) and uses[w.uid] == 1:  # x @ W.T
                w, sw = w.src[0], sw[::-1]
            if w.uid in names and uses[w.uid] == 1 and w.ndim == 2:
                return w, sw
            return None

        sites: dict[str, tuple[str, Node, Node | None]] = {}
        linear: set[int] = set()
        for z in order:
            if z.op is Op.EINSUM and len(z.src) == 2 and z.ndim >= 2 and z.sample_axis() == 0 and not z.arg.metric:
                (sx, sw), (x, w) = z.arg.inputs, z.src
                found = weight(w, sw)
                if found and x.ndim == z.ndim and x.sample_axis() == 0:
                    w, sw = found
                    if sx[-1] == sw[1] and z.arg.output == sx[:-1] + sw[0] and len(set(sx)) == len(sx):
                        sites[names[w.uid]] = ("weight", z, x)
                        linear.add(z.uid)
            elif z.op is Op.ADD and z.src[0].uid in linear:
                bias = z.src[1]
                if bias.uid in names and uses[bias.uid] == 1 and bias.ndim == 1 and bias.shape == z.shape[-1:]:
                    sites[names[bias.uid]] = ("bias", z, None)
        return sites

    @cached_property
    def conv_maps(self) -> dict[str, tuple[str, Node, Node | None]]:
        """Parameters used once as the weight (or bias) of a convolution (one group): name ->
        ("conv_weight", z, unfold) or ("conv_bias", z, None), where z (N, C_out, *positions) is the
        convolution's output before the bias and unfold the einsum (N, C_in, *taps, *positions) of
        its input with the index patterns (hogc/capture/nn_ops.py)."""
        order, uses, names = self._forward_uses

        def param(n: Node) -> Node | None:
            if n.op is Op.RESHAPE and uses[n.uid] == 1:
                n = n.src[0]
            return n if n.uid in names and uses[n.uid] == 1 else None

        sites: dict[str, tuple[str, Node, Node | None]] = {}
        convs: set[int] = set()
        for z in order:
            if z.op is Op.EINSUM and z.ndim >= 3 and z.sample_axis() == 0:
                eq = z.arg
                sizes = {c: n for s, x in zip(eq.inputs, z.src) for c, n in zip(s, x.shape)}
                if any(sizes[c] != 1 for c in eq.metric):  # a weight's 1-tap axes are summed alone
                    continue
                pats = [k for k, s in enumerate(z.src) if pattern_of(s) is not None]
                rest = [k for k in range(len(z.src)) if k not in pats]
                if len(rest) != 2:
                    continue
                ix, iw = rest if param(z.src[rest[1]]) is not None else rest[::-1]
                w, x, sx = param(z.src[iw]), z.src[ix], eq.inputs[ix]
                if w is None or w is not z.src[iw] or x.sample_axis() != 0 or w.ndim != x.ndim or w.ndim < 3:
                    continue  # one group only (no group axis), the weight used as it is
                by_h = {eq.inputs[k][0]: k for k in pats}
                # each spatial axis: a pattern's input letter, or a dense (1-tap) axis kept in the result
                if any(h not in by_h and h not in eq.output for h in sx[2:]) or any(h in eq.output for h in by_h) \
                        or set(by_h) - set(sx[2:]) or not z.src[ix].has_sample:
                    continue  # transposed convolutions are left out
                sw = eq.inputs[iw]  # (out channel, in channel, one tap letter per spatial axis)
                want = [eq.inputs[by_h[h]][1] if h in by_h else None for h in sx[2:]]
                if len(sw) != x.ndim or sw[1] != sx[1] or sw[0] not in eq.output or sw[1] in eq.output or any(
                        (t != c) if t is not None else (sizes[c] != 1 or c in eq.output) for t, c in zip(want, sw[2:])):
                    continue
                taps = "".join(eq.inputs[by_h[h]][1] for h in sx[2:] if h in by_h)
                pos = "".join(eq.inputs[by_h[h]][2] if h in by_h else h for h in sx[2:])
                unfold = B.einsum([sx] + [eq.inputs[k] for k in pats], sx[:2] + taps + pos,
                                  [x] + [z.src[k] for k in pats]) if pats else x
                shape = unfold.shape[:2] + tuple(z.src[by_h[h]].shape[1] if h in by_h else 1 for h in sx[2:]) + \
                    unfold.shape[2 + len(taps):]
                unfold = B.reshape(unfold, shape)
                sites[names[w.uid]] = ("conv_weight", z, unfold)
                convs.add(z.uid)
            elif z.op is Op.ADD and z.src[0].uid in convs:
                b = param(z.src[1])
                if b is not None and b.ndim == 1:
                    sites[names[b.uid]] = ("conv_bias", z.src[0], None)
        return sites

    @cached_property
    def vector(self) -> dict[str, Node]:
        """The direction v of the products, one INPUT per parameter (a parameter-space vector: upper)."""
        return {name: B.inp("vector", name, p.indices) for name, p in self.params.items()}


def derive(forward: Program, quantities: Sequence[str], spec: LossSpec, dtype: torch.dtype,
           param_shapes: dict[str, tuple[int, ...]], mc_samples: int = 1, top_k: int = 1,
           notes: dict[str, str] | None = None, partition: list[list[str]] | None = None,
           direction_given: bool = False, device_type: str = "cpu", partition_strategy: str = "auto",
           kfac_approx: str | None = None, column_chunks: int = 1) -> Program:
    """The derivative program: forward program (indices inferred) -> one output per quantity and
    parameter (``"grad/0.weight"``) or per quantity (``"loss"``). Quantities share nodes.

    ``param_shapes`` lists every trainable parameter in model order; one the loss does not depend
    on (absent from ``forward``) gets explicit zeros. ``notes``, if given, receives the strategy
    each quantity chose and why; ``device_type`` (where the program runs) informs strategy choices;
    ``column_chunks`` > 1 runs the square-root backward pass of quantities that sum over its
    columns in that many chunks, one after another (less memory, same arithmetic)."""
    out = forward.outputs["output"]
    used = {n.arg[1]: n for n in forward.inputs("param")}
    params = {name: used.get(name) or B.inp("param", name, tuple(
        Index(f"{name}.{k}", d, f"{name}.{k}", Variance.UP) for k, d in enumerate(shape)))
        for name, shape in param_shapes.items()}
    target = B.inp("target", "y", (out.indices[0],) if spec.kind == "cross_entropy" else out.indices)
    rng = B.inp("rng", "seed", ())
    builder = DerivativeBuilder(out, target, params, spec, dtype, rng, mc_samples, top_k)
    builder.partition, builder.direction_given = partition, direction_given
    builder.device_type, builder.partition_strategy = device_type, partition_strategy
    builder.kfac_approx, builder.column_chunks = kfac_approx, column_chunks
    outputs: dict[str, Node] = {}
    for qname in quantities:
        q = get_quantity(qname)
        res = q.build(builder)
        if q.per_param:
            outputs.update({f"{qname}/{k}": v for k, v in res.items()})
        else:
            outputs[qname] = res
    if notes is not None:
        notes.update(builder.notes)
    return Program.of(outputs)


def sum_parts(parts: list[dict[str, Node]]) -> dict[str, Node]:
    """Per key, the sum of the column chunks' parts, scheduled chunk after chunk: each chunk's
    results are flattened into one vector and the vectors are added, so the program's
    depth-first order finishes one chunk's backward pass before the next one starts (and its
    cotangents die first). One part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    keys = list(parts[0])
    sizes = [math.prod(parts[0][k].shape) for k in keys]
    total = None
    for part in parts:
        flat = B.cat([B.reshape(part[k], (n,)) for k, n in zip(keys, sizes)], 0)
        total = flat if total is None else B.add(total, flat)
    out, at = {}, 0
    for k, n in zip(keys, sizes):
        ref = parts[0][k]
        out[k] = B.reshape(B.slice_(total, 0, at, at + n), ref.shape, ref.indices)
        at += n
    return out


def square_sum(t: Node, keep_lead: str, lead: int, metric: bool) -> Node:
    """sum over the leading batch axes not in ``keep_lead`` of t*t; with ``metric`` also
    contract the parameter axes (a squared norm, Euclidean metric)."""
    L = B.letters(t.ndim)
    a, rest = L[:lead], L[lead:]
    out = "".join(ch for ch in a if ch in keep_lead) + ("" if metric else rest)
    return B.einsum([L, L], out, [t, t], metric=rest if metric else "")
