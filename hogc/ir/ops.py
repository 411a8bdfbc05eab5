"""The one op enum of hogc's IR. Reading this file tells you everything the IR can express.

Ops marked *basis-dependent* are not tensorial: they depend on the coordinates
(elementwise nonlinearities, Hadamard products, diagonal extraction). The index
verifier lets them mix variances; every other op must pair indices properly.
"""
from __future__ import annotations

from enum import Enum, auto

__all__ = ["Op", "BASIS_DEPENDENT", "LINEAR_STRUCTURAL", "LOSS_OPS", "LEAF_OPS"]


class Op(Enum):
    # --- leaves --------------------------------------------------------------
    INPUT = auto()  # arg: (role, name); role in {"param", "data", "target", "buffer", "rng"}
    CONST = auto()  # arg: python scalar (no indices) or Constant (a captured tensor)

    # --- elementwise (basis-dependent) ----------------------------------------
    ELEMENTWISE = auto()  # arg: (fname, order, params); src: (x,) or (x, y=f(x)); order-th derivative
    MUL = auto()  # broadcasting Hadamard product
    DIV = auto()  # broadcasting elementwise quotient

    # --- linear ---------------------------------------------------------------
    ADD = auto()  # broadcasting sum; operands must agree in variance and space
    SUB = auto()  # broadcasting difference

    # --- multilinear ----------------------------------------------------------
    EINSUM = auto()  # arg: Einsum(inputs, output, metric); a letter shared by >2 operands is a hyperedge

    # --- structural (linear, index bookkeeping) -------------------------------
    SUM = auto()  # arg: dims summed away
    RESHAPE = auto()  # arg: new shape
    PERMUTE = auto()  # arg: permutation
    EXPAND = auto()  # arg: new shape (broadcast size-1 dims, may prepend dims)
    SLICE = auto()  # arg: (dim, start, stop, step)
    PAD = auto()  # arg: (dim, start, step, size): transpose of SLICE, zeros elsewhere
    INDEX = auto()  # arg: (dim, indices): gather with constant indices
    INDEX_ADD = auto()  # arg: (dim, indices, size): transpose of INDEX (scatter-add into zeros)
    CAT = auto()  # arg: dim

    # --- losses (the boundary where the GGN splits) ---------------------------
    LOSS = auto()  # arg: LossSpec; src: (output, target); the scalar loss
    LOSS_GRAD = auto()  # arg: LossSpec; dL/df, shaped like the output (per-sample shares)
    LOSS_SQRT_HESSIAN = auto()  # arg: LossSpec; S with sum_c S_c S_c^T = d2L/df2, shape (C, *output)
    LOSS_SQRT_HESSIAN_MC = auto()  # arg: (LossSpec, mc_samples); src: (output, target, rng)


#: Ops whose result depends on the basis; they may combine indices of either variance.
BASIS_DEPENDENT = frozenset({Op.ELEMENTWISE, Op.MUL, Op.DIV})
#: Ops linear in their (single differentiable) input, whose transpose is structural.
LINEAR_STRUCTURAL = frozenset(
    {Op.SUM, Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.PAD, Op.INDEX, Op.INDEX_ADD, Op.CAT}
)
LOSS_OPS = frozenset({Op.LOSS, Op.LOSS_GRAD, Op.LOSS_SQRT_HESSIAN, Op.LOSS_SQRT_HESSIAN_MC})
LEAF_OPS = frozenset({Op.INPUT, Op.CONST})
