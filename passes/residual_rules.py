"""Second-order residual rules, one table keyed by op: what an op adds to the Hessian beyond the
GGN, given the gradient ``g`` backpropagated to its output.

The Hessian of ``L(F(theta))`` is the GGN plus, for every op ``v = op(u_1, ..., u_k)`` with a
non-zero second derivative, ``g . d2op`` pulled back through the Jacobians of its inputs:

* ``zero``: linear ops (sums, reshapes, slices, concatenation, broadcasting adds) and
  piecewise-constant ones (``NONDIFF``: argmax masks, one-hot encodings);
* ``diagonal``: elementwise ``y = f(u)``: ``diag(g * f''(u))`` in u's coordinates, with f''
  derived by sympy (``residual(node, g)`` builds it);
* ``cross``: multilinear ops (``a * b``, ``x @ W``, einsums): the bilinear cross term between two
  factors; it reaches a Hessian *diagonal* only where one parameter feeds two factors;
* ``curved``: ``a / b`` is curved in ``b``;
* ``loss``: the loss's own Hessian, which the GGN carries.

Hessian backpropagation (``hessian_diag``) reads the kinds from this table; forward-over-reverse
gets every term from the forward-mode table instead.
"""
from __future__ import annotations

from typing import Callable

from hogc.ir import Node, Op, build as B

from . import elementwise as E

__all__ = ["residual_kinds", "residual", "RESIDUAL_KINDS"]

RESIDUAL_KINDS = ("zero", "diagonal", "cross", "curved", "loss")
residual_kinds: dict[Op, str] = {}
_builders: dict[Op, Callable[[Node, Node], Node | None]] = {}


def defresidual(kind: str, *ops: Op):
    if kind not in RESIDUAL_KINDS:
        raise ValueError(f"unknown residual kind '{kind}'")

    def deco(fn=None):
        for op in ops:
            if op in residual_kinds:
                raise ValueError(f"residual rule for {op} registered twice")
            residual_kinds[op] = kind
            if fn is not None:
                _builders[op] = fn
        return fn
    return deco


defresidual("zero", Op.INPUT, Op.CONST, Op.ADD, Op.SUB, Op.SUM, Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE,
            Op.PAD, Op.INDEX, Op.INDEX_ADD, Op.GATHER, Op.SCATTER_ADD, Op.CAT, Op.NONDIFF, Op.WINDOWS)()
defresidual("cross", Op.MUL, Op.EINSUM, Op.CONV)()
defresidual("curved", Op.DIV, Op.SQUARE_PRODUCT)()  # the fused square is quadratic (never differentiated)
defresidual("loss", Op.LOSS, Op.LOSS_GRAD, Op.LOSS_SQRT_HESSIAN, Op.LOSS_SQRT_HESSIAN_MC,
            Op.LOSS_SQRT_HESSIAN_JVP, Op.EIGVALSH)()


@defresidual("diagonal", Op.ELEMENTWISE)
def _elementwise(node: Node, g: Node) -> Node | None:
    """``g * f''(u)`` for ``y = f(u)`` (None where f'' vanishes: relu, leaky_relu, abs, ...)."""
    fname, order, params = node.arg
    if order != 0:
        raise ValueError("residual rules apply to forward (order-0) elementwise nodes")
    if E.is_zero(fname, 2):
        return None
    u = node.src[0]
    d2 = B.elementwise(fname, 2, params, u, node if E.uses_output(fname, 2) else None)
    return B.mul(g, d2)


def residual(node: Node, g: Node) -> Node | None:
    """The diagonal residual of a ``diagonal``-kind node given its output gradient ``g``."""
    return _builders[node.op](node, g)
