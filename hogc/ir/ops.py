"""The one op enum of hogc's IR. Reading this file tells you everything the IR can express.

ELEMENTWISE, MUL and DIV are *basis-dependent*: they depend on the coordinates, so the
verifier lets them combine indices of either variance. ADD/SUB must agree in variance,
index-preserving ops (PERMUTE, SUM, SLICE, ...) must keep it, and an EINSUM must pair an
upper with a lower index of one space for every letter it sums, unless the letter is in
its explicit ``metric`` set (a Euclidean, basis-dependent contraction).
"""
from __future__ import annotations

from enum import Enum, auto

__all__ = ["Op", "LOSS_OPS", "LEAF_OPS", "TERMINAL_OPS"]


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
    GATHER = auto()  # arg: dim < 0; src (x, idx): torch.gather with runtime (integer) indices idx, which
    # broadcast right-aligned (so leading batch axes of x need none); x is shaped like the result but at dim
    SCATTER_ADD = auto()  # arg: (dim < 0, size); src (v, idx): transpose of GATHER (scatter-add into zeros)
    CAT = auto()  # arg: dim
    NONDIFF = auto()  # arg: (fname, params); a piecewise-constant function of src (x,): zero derivatives

    # --- linear algebra on finished results ------------------------------------
    EIGVALSH = auto()  # arg: k; the k largest eigenvalues of a symmetric matrix, descending
    CONV = auto()  # arg: (kind, stride, padding, dilation, output_padding, groups); src (x, w): a convolution
    # kernel call (kind forward, transposed, or weight: src (x, output grad), kernel size in place of
    # output_padding), introduced by scheduling for an index-pattern network (never differentiated)
    WINDOWS = auto()  # arg: (dim, taps, dilation, outputs, stride): axis dim of x becomes (taps, outputs) with
    # result[.., t, o, ..] = x[.., t dilation + o stride, ..]: a strided view (im2col without copying),
    # introduced by scheduling (never differentiated)
    SQUARE_PRODUCT = auto()  # arg: (product Einsum 'a,b->v', square Einsum 'v,v->out', why); src (a, b): the
    # sum of squares of a pairwise product in one fused kernel that never writes the product,
    # introduced by fuse_square_products where the cost model picks it (never differentiated)

    # --- losses (the boundary where the GGN splits) ---------------------------
    LOSS = auto()  # arg: LossSpec; src: (output, target); the scalar loss
    LOSS_GRAD = auto()  # arg: LossSpec; dL/df, shaped like the output (per-sample shares)
    LOSS_SQRT_HESSIAN = auto()  # arg: LossSpec; S with sum_c S_c S_c^T = d2L/df2, shape (C, *output)
    LOSS_SQRT_HESSIAN_MC = auto()  # arg: (LossSpec, mc_samples); src: (output, target, rng)
    LOSS_SQRT_HESSIAN_JVP = auto()  # arg: LossSpec; src: (output, target, tangent (s, *output)); dS[t], (s, C, *output)


LOSS_OPS = frozenset({Op.LOSS, Op.LOSS_GRAD, Op.LOSS_SQRT_HESSIAN, Op.LOSS_SQRT_HESSIAN_MC,
                      Op.LOSS_SQRT_HESSIAN_JVP})
LEAF_OPS = frozenset({Op.INPUT, Op.CONST})
#: Ops that only finish a derivative program and are never differentiated.
TERMINAL_OPS = frozenset({Op.EIGVALSH, Op.CONV, Op.WINDOWS, Op.SQUARE_PRODUCT})
