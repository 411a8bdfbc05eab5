"""Exact Hessian quantities: products, blocks, diagonals, the full matrix.

Diagonals use Hessian backpropagation (GGN diagonal plus signed square-root columns of each
curved activation's residual) when no parameter feeds two factors of a product; everything
else is forward-over-reverse, with all directions batched as one tangent index.
"""
from __future__ import annotations

import math

import torch

from hogc.passes import elementwise as E
from hogc.passes.backpropagate import backpropagate
from hogc.passes.fuse import fuse_einsums
from hogc.passes.paths import contract_pairwise, einsum_flops
from hogc.passes.push_forward import push_forward
from hogc.passes.residual_rules import residual, residual_kinds

from ..errors import HogcError, MissingRuleError
from ..ir import Index, Node, Op, Program, Variance, build as B, dual, topological_order
from .builder import DerivativeBuilder
from .ggn import ggn_diagonals
from .registry import MAX_ELEMENTS, register_quantity


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
                        f"GGN quantities (hessian_diag uses Hessian backpropagation where the model allows)")
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


def _residual_sites(b: DerivativeBuilder) -> list[Node] | None:
    """Hessian backpropagation applies when every second-order effect below the loss is an
    elementwise function of a (samples x features) value: returns those nodes y = f(u) with
    f'' != 0. ``None`` if the model multiplies two parameter-dependent values (a bilinear residual)
    or has curved elementwise functions of other shapes."""
    order = topological_order([b.output])
    influences: dict[int, frozenset[int]] = {}  # node -> the parameters it depends on
    for node in order:
        if node.op is Op.INPUT and node.arg[0] == "param":
            influences[node.uid] = frozenset({node.uid})
        else:
            influences[node.uid] = frozenset().union(*(influences[s.uid] for s in node.src)) if node.src \
                else frozenset()
    sites = []
    b.notes.pop("why_not_hbp", None)
    for node in order:
        if not influences[node.uid]:
            continue
        kind = residual_kinds.get(node.op)
        if kind is None:
            raise MissingRuleError(f"no second-order residual rule for op {node.op.name} (at {node.where})")
        if kind == "diagonal":
            if E.is_zero(node.arg[0], 2):
                continue
            if node.ndim != 2 or node.sample_axis() != 0:
                b.notes["why_not_hbp"] = f"{node.arg[0]} acts on a value of shape {node.shape}, not (samples, features)"
                return None
            sites.append(node)
        elif kind == "cross":
            # a product's cross term reaches the diagonal only where one parameter feeds two factors
            seen: set[int] = set()
            for s in node.src:
                if influences[s.uid] & seen:
                    b.notes["why_not_hbp"] = (f"a parameter feeds two factors of one product "
                                              f"({node.op.name.lower()} in {node.where or 'the model'})")
                    return None
                seen |= influences[s.uid]
        elif kind == "curved" and any(influences[s.uid] for s in node.src[1:]):
            b.notes["why_not_hbp"] = f"a division by a parameter-dependent value ({node.where})"
            return None
    return sites


def _hbp_diagonals(b: DerivativeBuilder, per_sample: bool) -> dict[str, Node]:
    """Exact Hessian diagonals by Hessian backpropagation: the GGN diagonal plus, for every curved
    elementwise y = f(u), the residual sum_j r_j (du_j/dtheta)^2 with r = (dL/dy) f''(u). Each
    residual is backpropagated from u as |r|^(1/2) on a Kronecker delta (one column per feature of
    u), and summed with the sign of r; fusion eliminates the delta, so a layer right below a residual
    costs a product of squares, not a column per feature."""
    out = ggn_diagonals(b, per_sample)
    sites = _residual_sites(b)
    cots = b.grad_cotangents({f"y{k}": y for k, y in enumerate(sites)})
    for k, y in enumerate(sites):
        if f"y{k}" not in cots:
            continue
        u = y.src[0]
        r = residual(y, cots[f"y{k}"])  # (n, U), lower: the residual's diagonal
        q = B.elementwise("sqrt", 0, (), B.elementwise("abs", 0, (), r))
        sign = B.elementwise("sign", 0, (), r)
        feat = r.indices[1]
        j = Index("j", feat.size, feat.space, Variance.BATCH)
        seed = B.einsum(["ju", "nu"], "jnu", [B.delta(j, feat, b.dtype), q], out_indices=(j,) + dual(u.indices))
        cols = backpropagate(u, seed, (j,), b.params, hadamard_einsum=True)
        for name, v in cols.items():
            L = B.letters(v.ndim)
            keep = L[1:] if per_sample else L[2:]
            term = B.einsum([L, L, L[1] + L[0]], keep, [v, v, sign], metric=L[0])
            out[name] = B.add(out[name], term)
    return out


#: with Hessian backpropagation available, forward-over-reverse is still costed for parameters up to
#: this size (its identity directions are built eagerly)
COMPARE_DIRECTIONS = 2048


def program_cost(outputs: dict[str, Node]) -> int:
    """Predicted work of a candidate program after fusion and path choice: multiply-adds of every
    contraction (x2) plus one operation per element of every other computed value."""
    program = contract_pairwise(fuse_einsums(Program.of(outputs)))
    cost = 0
    for n in program.nodes:
        if n.op is Op.EINSUM:
            cost += einsum_flops(n)
        elif n.op not in (Op.INPUT, Op.CONST):
            cost += math.prod(n.shape)
    return cost


def _diagonals(b: DerivativeBuilder, qname: str, per_sample: bool) -> dict[str, Node]:
    """Exact Hessian diagonals by the cheaper applicable strategy, as predicted by ``program_cost``
    for these shapes; the choice and the numbers go to ``fn.explain()``."""
    sites = _residual_sites(b)
    candidates: dict[str, dict[str, Node]] = {}
    if sites is not None:
        candidates["Hessian backpropagation"] = _hbp_diagonals(b, per_sample)
    limit = COMPARE_DIRECTIONS if sites is not None else MAX_DIRECTIONS
    if all(math.prod(p.shape) <= limit for p in b.params.values()) or sites is None:
        if per_sample:
            fwd = {k: B.reshape(_diagonal(b, _block(b, k, per_sample=True)), (b.N,) + b.params[k].shape)
                   for k in b.params}
        else:
            fwd = {k: B.reshape(_diagonal(b, _block(b, k)), b.params[k].shape) for k in b.params}
        candidates["forward-over-reverse"] = fwd
    costs = {name: program_cost(out) for name, out in candidates.items()}
    chosen = min(costs, key=costs.get)
    detail = ", ".join(f"{name} {c:.3g}" for name, c in costs.items())
    if chosen == "Hessian backpropagation":
        cols = " + ".join(str(y.shape[1]) for y in sites) or "none"
        why = (f"GGN diagonal ({num_cols(b)} square-root columns) plus {len(sites)} curved-activation residuals "
               f"(columns per sample: {cols}), Kronecker-delta seeds eliminated by fusion")
    else:
        why = "one tangent direction per parameter entry" + (
            "" if sites is not None else f"; Hessian backpropagation does not apply: {b.notes.get('why_not_hbp')}")
    b.notes[qname] = f"{chosen}: {why} (predicted operations: {detail})"
    return candidates[chosen]


def num_cols(b: DerivativeBuilder) -> int:
    return next(iter(b.sqrt_ggn.values())).shape[0]


@register_quantity("batch_hessian_diag", per_sample=True)
def _batch_hessian_diag(b):
    """Per-sample Hessian diagonals (each sample's loss share), shape (N, *param); they sum to
    hessian_diag. Hessian backpropagation or forward-over-reverse, whichever a cost model predicts
    cheaper (``fn.explain()`` says which and why)."""
    return _diagonals(b, "batch_hessian_diag", per_sample=True)


@register_quantity("hessian_diag")
def _hessian_diag(b):
    """The exact diagonal of the Hessian (residual terms included), shaped like each parameter.
    Hessian backpropagation or forward-over-reverse, whichever a cost model predicts cheaper."""
    return _diagonals(b, "hessian_diag", per_sample=False)


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
    # one push per parameter with its own identity directions: values that parameter does not
    # influence keep structural-zero tangents instead of dense rows of zeros. The Hessian is
    # symmetric, so the push for parameter k asks only for the gradients of k and later
    # parameters (lower layers' backward tangents are skipped); earlier blocks are transposes.
    names = list(blocks)
    block: dict[tuple[str, str], Node] = {}
    for i, name in enumerate(names):
        P = blocks[name][1]
        direction = _directions(b, {name: (0, P)}, P)[name]
        s = direction.indices[0]
        wanted = {k: _sum_samples_first(b.per_sample_grads[k]) for k in names[i:]}
        tangents = push_forward(wanted, {b.params[name].uid: direction})
        for k in names[i:]:
            Pk, t = blocks[k][1], tangents[k]
            block[name, k] = _zeros(b, (P, Pk), (s, Index("p", Pk, TANGENT, Variance.LOW))) if t is None else \
                B.reshape(t, (P, Pk))
    rows = []
    for i, name in enumerate(names):
        cols = []
        for j, k in enumerate(names):
            if j >= i:
                cols.append(block[name, k])
                continue
            upper = block[k, name]  # (P_k, P_name): relabel its transpose with this row's indices
            t = B.permute(upper, (1, 0))
            cols.append(B.reshape(t, t.shape, (block[name, name].indices[0], block[k, k].indices[1])))
        rows.append(B.cat(cols, 1))
    return B.cat(rows, 0)
