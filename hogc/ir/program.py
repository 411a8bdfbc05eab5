"""A program: named output nodes plus a schedule (topological order) of everything they need."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .node import Node
from .ops import Op

__all__ = ["Program", "topological_order"]


def topological_order(outputs) -> tuple[Node, ...]:
    """Post-order DFS (iterative) from the outputs: every node after its sources."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in outputs:
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            for s in reversed(node.src):
                if id(s) not in seen:
                    stack.append((s, False))
    return tuple(order)


@dataclass(frozen=True)
class Program:
    """``outputs`` maps a name to a node; ``nodes`` is the schedule (dead code is never in it)."""

    outputs: Mapping[str, Node]
    nodes: tuple[Node, ...] = field(default=())
    #: (result node, schedule record) for each contracted tensor network (set by contract_pairwise)
    networks: tuple = field(default=())

    def with_networks(self, networks) -> "Program":
        return Program(self.outputs, self.nodes, tuple(networks))

    @staticmethod
    def of(outputs: Mapping[str, Node]) -> "Program":
        return Program(dict(outputs), topological_order(outputs.values()))

    def inputs(self, role: str | None = None) -> list[Node]:
        return [n for n in self.nodes if n.op is Op.INPUT and (role is None or n.arg[0] == role)]

    def use_counts(self, outputs: bool = True) -> dict[int, int]:
        """How often each node (by uid) is read, by nodes and (with ``outputs``) as a result."""
        uses: dict[int, int] = {}
        for n in self.nodes:
            for s in n.src:
                uses[s.uid] = uses.get(s.uid, 0) + 1
        if outputs:
            for o in self.outputs.values():
                uses[o.uid] = uses.get(o.uid, 0) + 1
        return uses

    def users(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for n in self.nodes:
            for s in n.src:
                out[id(s)].append(n)
        return out
