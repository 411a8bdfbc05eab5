"""backpropagate: reverse mode over the IR, with extra batch indices and per-sample layout."""
from __future__ import annotations

from collections.abc import Iterable

from hogc.errors import MissingRuleError
from hogc.ir import Index, Node, Op, build as B, topological_order

from .vjp_rules import VjpContext, vjp_rules

__all__ = ["backpropagate", "depends_on"]


def depends_on(nodes: Iterable[Node], leaves: set[int]) -> set[int]:
    """uids of the nodes (in topological order) that depend on any of ``leaves``."""
    dep = set(leaves)
    for n in nodes:
        if n.op is not Op.NONDIFF and any(s.uid in dep for s in n.src):  # piecewise constant
            dep.add(n.uid)
    return dep


def backpropagate(output: Node, seed: Node, lead: tuple[Index, ...], wrt: dict[str, Node],
                  also: dict[str, Node] | None = None, hadamard_einsum: bool = False) -> dict[str, Node]:
    """Cotangents of ``wrt`` (and of the intermediate values ``also``) given the cotangent ``seed``
    of ``output``.

    Args:
        output: the model output (has a sample axis).
        seed: its cotangent, indices ``lead + dual(output.indices)``.
        lead: the extra batch indices carried through (``()`` for the gradient, the
            columns of the loss-Hessian square root for the GGN).
        wrt: parameter input nodes by name.
        also: intermediate nodes by name whose cotangents are wanted too (e.g. the outputs of
            linear maps, for Kronecker factors).
        hadamard_einsum: write activations' Hadamard products as einsums (see VjpContext).

    Returns:
        Per-sample cotangents by name, indices ``lead + (n,) + dual(param.indices)`` (for a
        node with a sample axis ``lead + dual(indices)``); names the output does not depend on,
        or whose values do not depend on a parameter, are missing.
    """
    order = topological_order([output])
    dep = depends_on(order, {p.uid for p in wrt.values()})
    sample = output.indices[output.sample_axis()]
    ctx = VjpContext(tuple(lead), sample, lambda s: s.uid in dep, hadamard_einsum)
    pending: dict[int, list[Node]] = {output.uid: [seed]}
    result: dict[int, Node] = {}
    for node in reversed(order):
        parts = pending.pop(node.uid, None)
        if not parts:
            continue
        cot = parts[0]
        for p in parts[1:]:
            cot = B.add(cot, p)
        result[node.uid] = cot
        if node.op is Op.INPUT:
            continue
        rule = vjp_rules.get(node.op)
        if rule is None:
            raise MissingRuleError(f"no reverse-mode rule for op {node.op.name} (at {node.where})")
        for src, c in zip(node.src, rule(node, cot, ctx)):
            if c is not None and src.uid in dep:
                pending.setdefault(src.uid, []).append(c)
    wanted = dict(wrt) | dict(also or {})
    return {name: result[p.uid] for name, p in wanted.items() if p.uid in result}
