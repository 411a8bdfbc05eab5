"""The quantity registry: each quantity is a small function of a shared derivative builder.

Every derivative quantity of this module is a contraction of two reverse-mode results:

* ``P[θ]_{n...}``: per-sample gradients (backpropagating ``dL/df``),
* ``V[θ]_{cn...}``: per-sample Jacobian-transposed columns of the loss-Hessian square root
  (backpropagating ``S`` with one more batch index ``c``), exact or Monte-Carlo.

The optimization passes then turn e.g. ``sum_{c,n} V^2`` into BackPACK's formulas.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from hogc.passes.backpropagate import backpropagate
from hogc.passes.push_forward import push_forward
from hogc.passes.vjp_rules import cot_indices

from .capture.losses import num_columns
from .errors import HogcError, UnknownQuantityError, UnsupportedOpError
from .ir import COLUMN, Index, LossSpec, Node, Op, Program, Variance, build as B, dual, topological_order

__all__ = ["Quantity", "QUANTITIES", "register_quantity", "DerivativeBuilder", "get_quantity", "derive"]


@dataclass(frozen=True)
class Quantity:
    name: str
    build: Callable[["DerivativeBuilder"], "Node | dict[str, Node]"]
    per_param: bool  # result keyed by parameter name
    doc: str
    takes_vector: bool = False  # the compiled function takes a vector v (dict keyed like the parameters)


QUANTITIES: dict[str, Quantity] = {}
#: the largest dense result or intermediate (elements) a quantity may need before hogc refuses it
MAX_ELEMENTS = 2**28


def register_quantity(name: str, *, per_param: bool = True, takes_vector: bool = False):
    def deco(fn):
        if name in QUANTITIES:
            raise ValueError(f"quantity '{name}' is already registered")
        QUANTITIES[name] = Quantity(name, fn, per_param, (fn.__doc__ or "").strip(), takes_vector)
        return fn
    return deco


def get_quantity(name: str) -> Quantity:
    if name not in QUANTITIES:
        raise UnknownQuantityError(f"unknown quantity '{name}'; valid quantities: {', '.join(QUANTITIES)}")
    return QUANTITIES[name]


class DerivativeBuilder:
    """Builds (and shares, via hash-consing) the derivative graphs quantities need."""

    def __init__(self, output: Node, target: Node, params: dict[str, Node], spec: LossSpec, dtype: torch.dtype,
                 rng: Node | None = None, mc_samples: int = 1, top_k: int = 1):
        self.output, self.target, self.params, self.spec, self.dtype = output, target, params, spec, dtype
        self.rng, self.mc_samples, self.top_k = rng, mc_samples, top_k
        self.N = output.shape[output.sample_axis()]
        self.sample = output.indices[output.sample_axis()]

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

    @cached_property
    def per_sample_grads(self) -> dict[str, Node]:
        seed = Node(Op.LOSS_GRAD, (self.output, self.target), self.spec, dual(self.output.indices))
        return self._backprop(seed, ())

    def _columns(self, op: Op, arg, src, C: int, name: str) -> dict[str, Node]:
        c = Index(name, C, COLUMN, Variance.BATCH)
        return self._backprop(Node(op, src, arg, (c,) + dual(self.output.indices)), (c,))

    @cached_property
    def sqrt_ggn(self) -> dict[str, Node]:
        C = num_columns(self.spec, self.output.shape)
        return self._columns(Op.LOSS_SQRT_HESSIAN, self.spec, (self.output, self.target), C, "c")

    @cached_property
    def sqrt_ggn_mc(self) -> dict[str, Node]:
        return self._columns(Op.LOSS_SQRT_HESSIAN_MC, (self.spec, self.mc_samples),
                             (self.output, self.target, self.rng), self.mc_samples, "m")

    def column_cotangents(self, mc: bool, nodes: dict[str, Node]) -> dict[str, Node]:
        """Cotangents of intermediate ``nodes`` in the exact (or Monte-Carlo) square-root backward
        pass; the pass itself is shared with ``sqrt_ggn`` through hash-consing."""
        if mc:
            c = Index("m", self.mc_samples, COLUMN, Variance.BATCH)
            seed = Node(Op.LOSS_SQRT_HESSIAN_MC, (self.output, self.target, self.rng), (self.spec, self.mc_samples),
                        (c,) + dual(self.output.indices))
        else:
            c = Index("c", num_columns(self.spec, self.output.shape), COLUMN, Variance.BATCH)
            seed = Node(Op.LOSS_SQRT_HESSIAN, (self.output, self.target), self.spec, (c,) + dual(self.output.indices))
        cots = backpropagate(self.output, seed, (c,), self.params, also=nodes)
        return {k: cots[k] for k in nodes if k in cots}

    @cached_property
    def linear_maps(self) -> dict[str, tuple[str, Node, Node | None]]:
        """Parameters used once in a linear map ``z_{no} = W_{oi} x_{ni} (+ b_o)`` (``F.linear``, or
        ``x @ W.T``): name -> ("weight", z, x) or ("bias", z + b, None). A bias factor uses the
        cotangent of ``z + b`` itself: ``z`` may have other uses."""
        order = topological_order([self.output])
        uses: dict[int, int] = {}
        for n in order:
            for src in n.src:
                uses[src.uid] = uses.get(src.uid, 0) + 1
        names = {p.uid: k for k, p in self.params.items()}

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
            if z.op is Op.EINSUM and len(z.src) == 2 and z.ndim == 2 and z.sample_axis() == 0 and not z.arg.metric:
                (sx, sw), (x, w) = z.arg.inputs, z.src
                found = weight(w, sw)
                if found and x.ndim == 2 and x.sample_axis() == 0:
                    w, sw = found
                    if sx[1] == sw[1] and z.arg.output == sx[0] + sw[0]:
                        sites[names[w.uid]] = ("weight", z, x)
                        linear.add(z.uid)
            elif z.op is Op.ADD and z.src[0].uid in linear:
                bias = z.src[1]
                if bias.uid in names and uses[bias.uid] == 1 and bias.ndim == 1 and bias.shape == z.shape[1:]:
                    sites[names[bias.uid]] = ("bias", z, None)
        return sites

    @cached_property
    def vector(self) -> dict[str, Node]:
        """The direction v of the products, one INPUT per parameter (a parameter-space vector: upper)."""
        return {name: B.inp("vector", name, p.indices) for name, p in self.params.items()}


def derive(forward: Program, quantities: Sequence[str], spec: LossSpec, dtype: torch.dtype,
           param_shapes: dict[str, tuple[int, ...]], mc_samples: int = 1, top_k: int = 1) -> Program:
    """The derivative program: forward program (indices inferred) -> one output per quantity and
    parameter (``"grad/0.weight"``) or per quantity (``"loss"``). Quantities share nodes.

    ``param_shapes`` lists every trainable parameter in model order; one the loss does not depend
    on (absent from ``forward``) gets explicit zeros."""
    out = forward.outputs["output"]
    used = {n.arg[1]: n for n in forward.inputs("param")}
    params = {name: used.get(name) or B.inp("param", name, tuple(
        Index(f"{name}.{k}", d, f"{name}.{k}", Variance.UP) for k, d in enumerate(shape)))
        for name, shape in param_shapes.items()}
    target = B.inp("target", "y", (out.indices[0],) if spec.kind == "cross_entropy" else out.indices)
    rng = B.inp("rng", "generator", ())
    builder = DerivativeBuilder(out, target, params, spec, dtype, rng, mc_samples, top_k)
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


@register_quantity("batch_grad")
def _batch_grad(b):
    """Per-sample gradients (each sample's share of the loss; they sum to grad)."""
    return dict(b.per_sample_grads)


@register_quantity("batch_l2")
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


@register_quantity("batch_ggn_diag")
def _batch_ggn_diag(b):
    """Per-sample GGN diagonals (they sum to ggn_diag)."""
    return {k: _square_sum(v, B.letters(2)[1], 2, metric=False) for k, v in b.sqrt_ggn.items()}


@register_quantity("ggn_diag_mc")
def _ggn_diag_mc(b):
    """Monte-Carlo GGN diagonal (Fisher with sampled targets), mc_samples columns."""
    return {k: _square_sum(v, "", 2, metric=False) for k, v in b.sqrt_ggn_mc.items()}


# --- GGN blocks, full matrix, factor, products, spectrum ------------------------------------

def _guard(what: str, elements: int, result: str) -> None:
    if elements > MAX_ELEMENTS:
        raise HogcError(f"{result} of {what} has {elements} entries (more than {MAX_ELEMENTS}); use ggn_diag, "
                        f"kflr, ggnvp or ggn_eigen instead")


def _flat_columns(b: DerivativeBuilder) -> Node:
    """All parameters' square-root columns side by side: (C, N, D), parameters in model order."""
    flats = []
    for v in b.sqrt_ggn.values():
        P = math.prod(v.shape[2:])
        flats.append(B.reshape(v, v.shape[:2] + (P,)))
    return B.cat(flats, 2)


@register_quantity("sqrt_ggn")
def _sqrt_ggn(b):
    """V with GGN = V V^T: per parameter (C, N, *param), BackPACK's SqrtGGNExact layout."""
    return dict(b.sqrt_ggn)


@register_quantity("ggn_block")
def _ggn_block(b):
    """The exact (P x P) GGN block of each parameter (P = param.numel(), row-major)."""
    out = {}
    for k, v in b.sqrt_ggn.items():
        _guard(k, math.prod(v.shape[2:]) ** 2, "its GGN block")
        nd = v.ndim - 2
        L = B.letters(2 + 2 * nd)
        c, n, A, Bl = L[0], L[1], L[2:2 + nd], L[2 + nd:]
        block = B.einsum([c + n + A, c + n + Bl], A + Bl, [v, v])
        P = math.prod(v.shape[2:])
        out[k] = B.reshape(block, (P, P))
    return out


@register_quantity("ggn", per_param=False)
def _ggn(b):
    """The full (D x D) GGN over all trainable parameters, flattened and concatenated in
    ``named_parameters()`` order."""
    V = _flat_columns(b)
    _guard("the model", V.shape[2] ** 2, "the full GGN")
    return B.einsum(["cna", "cnb"], "ab", [V, V])


@register_quantity("ggnvp", takes_vector=True)
def _ggnvp(b):
    """GGN times the vector v (dict keyed like the parameters): sum_n J_n^T H_n J_n v, matrix-free."""
    u = None  # u_{cn} = sum_theta V_theta . v_theta: the columns applied to v (a Jacobian-vector product)
    for k, v in b.sqrt_ggn.items():
        L = B.letters(v.ndim)
        t = B.einsum([L, L[2:]], L[:2], [v, b.vector[k]])
        u = t if u is None else B.add(u, t)
    out = {}
    for k, v in b.sqrt_ggn.items():
        L = B.letters(v.ndim)
        out[k] = B.einsum([L[:2], L], L[2:], [u, v])
    return out


@register_quantity("ggn_eigen", per_param=False)
def _ggn_eigen(b):
    """The ``top_k`` largest GGN eigenvalues, from the (CN x CN) Gram matrix V^T V (ViViT)."""
    gram = None
    for v in b.sqrt_ggn.values():  # one Gram term per parameter, so fusion can factor each one
        L = B.letters(v.ndim + 2)
        c, n, d, m, A = L[0], L[1], L[2], L[3], L[4:]
        g = B.einsum([c + n + A, d + m + A], c + n + d + m, [v, v], metric=A)  # Euclidean inner product
        gram = g if gram is None else B.add(gram, g)
    C, N = gram.shape[:2]
    gram = B.reshape(gram, (C * N, C * N))
    D = sum(math.prod(v.shape[2:]) for v in b.sqrt_ggn.values())
    k = min(b.top_k, C * N, D)  # the GGN has rank <= min(CN, D); the Gram matrix's other eigenvalues are 0
    return Node(Op.EIGVALSH, (gram,), k, (Index("k", k, "eigen", Variance.BATCH),))


# --- Kronecker factors ----------------------------------------------------------------------

def _kronecker(b: DerivativeBuilder, mc: bool) -> dict[str, Node]:
    """Per parameter of a linear map, the factors (B, A) with B (x) A approximating its GGN block:
    B = sum_{c,n} g_cn g_cn^T from the square-root backward pass (output side, lower-lower) and
    A = mean_n x_n x_n^T (input side, upper-upper); a bias gets (B,). Keys ``"<name>/<k>"``."""
    sites = b.linear_maps
    if not sites:
        raise UnsupportedOpError("no parameter is used exactly once as the weight of a linear map on a 2-d "
                                 "input (F.linear(x, W, b) or x @ W.T + b), so there are no Kronecker factors to "
                                 "compute (weights shared over positions or layers arrive with the sequence work)")
    cots = b.column_cotangents(mc, {f"z{k}": z for k, (_, z, _) in sites.items()})
    out = {}
    for name, (kind, z, x) in sites.items():
        g = cots[f"z{name}"]
        o = g.indices[2]
        out[f"{name}/0"] = B.einsum(["cno", "cnp"], "op", [g, g], out_indices=(o, o))
        if kind == "weight":
            i = x.indices[1]
            a = B.einsum(["ni", "nj"], "ij", [x, x], out_indices=(i, i))
            out[f"{name}/1"] = B.scale(a, 1.0 / b.N)
    return out


@register_quantity("kflr")
def _kflr(b):
    """Kronecker factors from the exact loss-Hessian square root (KFLR): (B, A) for weights of
    linear maps, (B,) for their biases; GGN block ~ B (x) A. Other parameters are left out."""
    return _kronecker(b, mc=False)


@register_quantity("kfac")
def _kfac(b):
    """Kronecker factors from the Monte-Carlo square root (KFAC, ``mc_samples`` columns, seeded like
    ggn_diag_mc); same layout as kflr."""
    return _kronecker(b, mc=True)


# --- Hessian quantities: forward-over-reverse --------------------------------------------

#: Hessian blocks and diagonals here cost one Hessian-vector product per parameter entry (all
#: batched as tangent directions); beyond this many entries per parameter hogc refuses.
MAX_DIRECTIONS = 8192
TANGENT = "tangent"


def _directions(b: DerivativeBuilder, blocks: dict[str, tuple[int, int]], D: int) -> dict[str, Node]:
    """Identity directions as tangents: parameter ``k`` gets rows ``[start, start + P)`` of eye(D)."""
    s = Index("s", D, TANGENT, Variance.BATCH)
    eye = torch.eye(D, dtype=b.dtype)
    out = {}
    for k, (start, P) in blocks.items():
        p = b.params[k]
        out[k] = B.const_tensor(eye[:, start:start + P].reshape((D,) + p.shape), (s,) + p.indices)
    return out


def _tangent_grads(b: DerivativeBuilder, tangents: dict[str, Node], per_sample: bool = False
                   ) -> dict[str, Node | None]:
    """Forward mode through the gradients: ``(s, *param)`` per parameter (``(s, n, *param)`` with
    ``per_sample``), ``None`` where the gradient does not depend on the directions. Summing the
    samples before pushing forward lets fusion avoid the (directions x samples x entries) tensor."""
    grads = b.per_sample_grads if per_sample else {k: _sum_samples_first(p) for k, p in b.per_sample_grads.items()}
    return push_forward(grads, {b.params[k].uid: t for k, t in tangents.items()})


def _block_directions(b: DerivativeBuilder, name: str) -> tuple[int, Node]:
    P = math.prod(b.params[name].shape)
    if P > MAX_DIRECTIONS:
        raise HogcError(f"parameter '{name}' has {P} entries; its exact Hessian block or diagonal costs one "
                        f"Hessian-vector product per entry here (limit {MAX_DIRECTIONS}). Use hvp, or the "
                        f"GGN quantities; Hessian backpropagation for large layers is planned")
    return P, _directions(b, {name: (0, P)}, P)[name]


def _zeros(b: DerivativeBuilder, shape, indices) -> Node:
    return B.const_tensor(torch.zeros(shape, dtype=b.dtype), indices)


@register_quantity("hvp", takes_vector=True)
def _hvp(b):
    """Hessian times the vector v (dict keyed like the parameters), forward-over-reverse."""
    s = Index("s", 1, TANGENT, Variance.BATCH)
    tangents = {k: B.reshape(v, (1,) + v.shape, (s,) + v.indices) for k, v in b.vector.items()}
    out = {}
    for k, t in _tangent_grads(b, tangents).items():
        p = b.params[k]
        out[k] = _zeros(b, p.shape, tuple(i.dual() for i in p.indices)) if t is None else \
            B.reshape(t, p.shape, t.indices[1:])
    return out


def _block(b: DerivativeBuilder, name: str, per_sample: bool = False) -> Node:
    """Hessian rows of one parameter's block, directions first: (P, P), or (P, n, P) per sample."""
    P, direction = _block_directions(b, name)
    if per_sample and P * b.N * P > MAX_ELEMENTS:
        raise HogcError(f"batch_hessian_diag of '{name}' needs a ({P}, {b.N}, {P}) intermediate here, more than "
                        f"{MAX_ELEMENTS} elements; use hessian_diag (the batch total) or a smaller batch")
    t = _tangent_grads(b, {name: direction}, per_sample)[name]
    shape = (P, b.N, P) if per_sample else (P, P)
    if t is None:
        s, flat = direction.indices[0], Index("p", P, TANGENT, Variance.LOW)
        return _zeros(b, shape, (s, b.sample, flat) if per_sample else (s, flat))
    return B.reshape(t, shape)


def _diagonal(b: DerivativeBuilder, block: Node) -> Node:
    """The diagonal of a (P, P) block, or of each sample's block in (P, n, P): a basis-dependent
    extraction, written as a contraction with the identity."""
    P = block.shape[0]
    s, flat = block.indices[0], block.indices[-1]
    eye = B.const_tensor(torch.eye(P, dtype=b.dtype), (s, flat.dual()))
    if block.ndim == 2:
        return B.einsum(["ab", "ab"], "a", [block, eye], out_indices=(flat,))
    return B.einsum(["anb", "ab"], "na", [block, eye], out_indices=(block.indices[1], flat))


@register_quantity("hessian_block")
def _hessian_block(b):
    """The exact (P x P) Hessian block of each parameter, row-major flattening."""
    return {k: _block(b, k) for k in b.params}


@register_quantity("batch_hessian_diag")
def _batch_hessian_diag(b):
    """Per-sample Hessian diagonals (each sample's loss share), shape (N, *param); they sum to
    hessian_diag."""
    return {k: B.reshape(_diagonal(b, _block(b, k, per_sample=True)), (b.N,) + b.params[k].shape)
            for k in b.params}


@register_quantity("hessian_diag")
def _hessian_diag(b):
    """The exact diagonal of the Hessian (residual terms included), shaped like each parameter."""
    return {k: B.reshape(_diagonal(b, _block(b, k)), b.params[k].shape) for k in b.params}


def _sum_samples_first(t: Node) -> Node:
    L = B.letters(t.ndim)
    return B.einsum([L], L[1:], [t])


@register_quantity("hessian", per_param=False)
def _hessian(b):
    """The full (D x D) Hessian over all trainable parameters (``named_parameters()`` order)."""
    blocks, start = {}, 0
    for k, p in b.params.items():
        blocks[k] = (start, math.prod(p.shape))
        start += blocks[k][1]
    D = start
    if D > MAX_DIRECTIONS:
        raise HogcError(f"the model has {D} parameters; the full Hessian costs one Hessian-vector product per "
                        f"parameter here (limit {MAX_DIRECTIONS})")
    tangents = _directions(b, blocks, D)
    cols = []
    for k, t in _tangent_grads(b, tangents).items():
        P = blocks[k][1]
        s = tangents[k].indices[0]
        cols.append(_zeros(b, (D, P), (s, Index("p", P, TANGENT, Variance.LOW))) if t is None else
                    B.reshape(t, (D, P)))
    return B.cat(cols, 1)
