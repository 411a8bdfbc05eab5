"""push_forward: forward mode over the IR with a tangent batch index."""
from __future__ import annotations

from hogc.errors import MissingRuleError
from hogc.ir import Node, Op, topological_order

from .jvp_rules import jvp_rules

__all__ = ["push_forward"]


def push_forward(outputs: dict[str, Node], tangents: dict[int, Node]) -> dict[str, Node | None]:
    """Tangents of ``outputs`` given the tangents of some INPUT nodes (by uid).

    Every tangent has indices ``(s,) + value.indices``; one that is ``None`` in the result is a
    structural zero (the output does not depend on the perturbed inputs).
    """
    order = topological_order(outputs.values())
    tan: dict[int, Node | None] = dict(tangents)
    for node in order:
        if node.uid in tan:
            continue
        if node.op in (Op.INPUT, Op.CONST, Op.NONDIFF) or all(tan.get(s.uid) is None for s in node.src):
            tan[node.uid] = None
            continue
        rule = jvp_rules.get(node.op)
        if rule is None:
            raise MissingRuleError(f"no forward-mode rule for op {node.op.name} (at {node.where})")
        tan[node.uid] = rule(node, [tan.get(s.uid) for s in node.src])
    return {k: tan[v.uid] for k, v in outputs.items()}
