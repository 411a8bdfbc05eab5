"""The quantity registry: each quantity is a small function of a shared derivative builder.

Every derivative quantity of this module is a contraction of two reverse-mode results:

* ``P[θ]_{n...}``: per-sample gradients (backpropagating ``dL/df``),
* ``V[θ]_{cn...}``: per-sample Jacobian-transposed columns of the loss-Hessian square root
  (backpropagating ``S`` with one more batch index ``c``), exact or Monte-Carlo.

The optimization passes then turn e.g. ``sum_{c,n} V^2`` into BackPACK's formulas.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from hogc.passes.backpropagate import backpropagate

from .capture.losses import num_columns
from .errors import UnknownQuantityError
from .ir import COLUMN, Index, LossSpec, Node, Op, Program, Variance, build as B, dual

__all__ = ["Quantity", "QUANTITIES", "register_quantity", "DerivativeBuilder", "get_quantity", "derive"]


@dataclass(frozen=True)
class Quantity:
    name: str
    build: Callable[["DerivativeBuilder"], "Node | dict[str, Node]"]
    per_param: bool  # result keyed by parameter name
    batch: bool  # leading sample axis
    doc: str
    param_shaped: bool = True  # per-parameter results shaped like the parameter (after the sample axis)


QUANTITIES: dict[str, Quantity] = {}


def register_quantity(name: str, *, per_param: bool = True, batch: bool = False, param_shaped: bool = True):
    def deco(fn):
        if name in QUANTITIES:
            raise ValueError(f"quantity '{name}' is already registered")
        QUANTITIES[name] = Quantity(name, fn, per_param, batch, (fn.__doc__ or "").strip(), param_shaped)
        return fn
    return deco


def get_quantity(name: str) -> Quantity:
    if name not in QUANTITIES:
        raise UnknownQuantityError(f"unknown quantity '{name}'; valid quantities: {', '.join(QUANTITIES)}")
    return QUANTITIES[name]


class DerivativeBuilder:
    """Builds (and shares, via hash-consing) the derivative graphs quantities need."""

    def __init__(self, output: Node, target: Node, params: dict[str, Node], spec: LossSpec,
                 rng: Node | None = None, mc_samples: int = 1):
        self.output, self.target, self.params, self.spec = output, target, params, spec
        self.rng, self.mc_samples = rng, mc_samples
        self.N = output.shape[output.sample_axis()]

    @cached_property
    def loss(self) -> Node:
        return Node(Op.LOSS, (self.output, self.target), self.spec, ())

    @cached_property
    def per_sample_grads(self) -> dict[str, Node]:
        seed = Node(Op.LOSS_GRAD, (self.output, self.target), self.spec, dual(self.output.indices))
        return backpropagate(self.output, seed, (), self.params)

    def _columns(self, op: Op, arg, src, C: int, name: str) -> dict[str, Node]:
        c = Index(name, C, COLUMN, Variance.BATCH)
        seed = Node(op, src, arg, (c,) + dual(self.output.indices))
        return backpropagate(self.output, seed, (c,), self.params)

    @cached_property
    def sqrt_ggn(self) -> dict[str, Node]:
        C = num_columns(self.spec, self.output.shape)
        return self._columns(Op.LOSS_SQRT_HESSIAN, self.spec, (self.output, self.target), C, "c")

    @cached_property
    def sqrt_ggn_mc(self) -> dict[str, Node]:
        return self._columns(Op.LOSS_SQRT_HESSIAN_MC, (self.spec, self.mc_samples),
                             (self.output, self.target, self.rng), self.mc_samples, "m")


def derive(forward: Program, quantities: Sequence[str], spec: LossSpec, mc_samples: int = 1) -> Program:
    """The derivative program: forward program (indices inferred) -> one output per quantity and
    parameter (``"grad/0.weight"``) or per quantity (``"loss"``). Quantities share nodes."""
    out = forward.outputs["output"]
    params = {n.arg[1]: n for n in forward.inputs("param")}
    target = B.inp("target", "y", (out.indices[0],) if spec.kind == "cross_entropy" else out.indices)
    rng = B.inp("rng", "generator", ())
    builder = DerivativeBuilder(out, target, params, spec, rng, mc_samples)
    outputs: dict[str, Node] = {}
    for qname in quantities:
        q = get_quantity(qname)
        res = q.build(builder)
        if q.per_param:
            outputs.update({f"{qname}/{k}": v for k, v in res.items()})
        else:
            outputs[qname] = res
    return Program.of(outputs)


def _square_sum(t: Node, keep_lead: str, lead: int, metric: bool) -> Node:
    """sum over the leading batch axes not in ``keep_lead`` of t*t; with ``metric`` also
    contract the parameter axes (a squared norm, Euclidean metric)."""
    L = B.letters(t.ndim)
    a, rest = L[:lead], L[lead:]
    out = "".join(ch for ch in a if ch in keep_lead) + ("" if metric else rest)
    return B.einsum([L, L], out, [t, t], metric=rest if metric else "")


@register_quantity("loss", per_param=False)
def _loss(b: DerivativeBuilder):
    """The loss, reduction included."""
    return b.loss


@register_quantity("grad")
def _grad(b):
    """Gradient of the loss."""
    return {k: B.einsum([B.letters(p.ndim)], B.letters(p.ndim - 1, 1), [p])
            for k, p in b.per_sample_grads.items()}


@register_quantity("batch_grad", batch=True)
def _batch_grad(b):
    """Per-sample gradients (each sample's share of the loss; they sum to grad)."""
    return dict(b.per_sample_grads)


@register_quantity("batch_l2", batch=True, param_shaped=False)
def _batch_l2(b):
    """Squared l2 norm of each per-sample gradient, shape (N,)."""
    return {k: _square_sum(p, B.letters(1), 1, metric=True) for k, p in b.per_sample_grads.items()}


@register_quantity("sum_grad_squared")
def _sgs(b):
    """Sum over samples of the squared per-sample gradients."""
    return {k: _square_sum(p, "", 1, metric=False) for k, p in b.per_sample_grads.items()}


@register_quantity("variance")
def _variance(b):
    """mean_n (batch_grad_n)^2 - (mean_n batch_grad_n)^2, as BackPACK defines it."""
    sgs, grad = _sgs(b), _grad(b)
    out = {}
    for k in sgs:
        m = B.scale(grad[k], 1.0 / b.N)
        out[k] = B.sub(B.scale(sgs[k], 1.0 / b.N), B.mul(m, m))
    return out


@register_quantity("ggn_diag")
def _ggn_diag(b):
    """Diagonal of the generalized Gauss-Newton matrix J^T (d2L/df2) J (exact square root)."""
    return {k: _square_sum(v, "", 2, metric=False) for k, v in b.sqrt_ggn.items()}


@register_quantity("batch_ggn_diag", batch=True)
def _batch_ggn_diag(b):
    """Per-sample GGN diagonals (they sum to ggn_diag)."""
    return {k: _square_sum(v, B.letters(2)[1], 2, metric=False) for k, v in b.sqrt_ggn.items()}


@register_quantity("ggn_diag_mc")
def _ggn_diag_mc(b):
    """Monte-Carlo GGN diagonal (Fisher with sampled targets), mc_samples columns."""
    return {k: _square_sum(v, "", 2, metric=False) for k, v in b.sqrt_ggn_mc.items()}
