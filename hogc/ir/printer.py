"""Readable text for IR programs: one line per node, indices with their variance.

``h1^512`` is an upper (contravariant) index of size 512 in space h1, ``h1_512`` a lower
(covariant) one, ``n.128`` a batch index.
"""
from __future__ import annotations

from .index import fmt_indices
from .node import Constant, Node
from .ops import Op
from .program import Program

__all__ = ["format_program", "format_node"]


def _arg(node: Node) -> str:
    a = node.arg
    if node.op is Op.INPUT:
        return f"{a[0]} '{a[1]}'"
    if node.op is Op.CONST:
        return repr(a) if isinstance(a, Constant) else f"{a:g}"
    if node.op is Op.ELEMENTWISE:
        fname, order, params = a
        tick = "'" * order if order <= 3 else f"^({order})"
        return f"{fname}{tick}" + (f"{list(params)}" if params else "")
    if a is None:
        return ""
    return str(a)


def format_node(node: Node, names: dict[int, str]) -> str:
    args = ", ".join(names.get(id(s), f"%{s.uid}") for s in node.src)
    arg = _arg(node)
    head = node.op.name.lower() + (f"[{arg}]" if arg else "")
    text = f"{head}({args})" if node.src else head
    where = f"   # {node.where}" if node.where is not None and node.where.module else ""
    return f"{text:<52} : {fmt_indices(node.indices)}{where}"


def format_program(program: Program, limit: int | None = None) -> str:
    names: dict[int, str] = {}
    lines = []
    for k, node in enumerate(program.nodes):
        names[id(node)] = f"%{k}"
        lines.append(f"{'%' + str(k):>5} = {format_node(node, names)}")
    if limit is not None and len(lines) > limit:
        lines = lines[:limit] + [f"  ... ({len(program.nodes) - limit} more nodes)"]
    outs = ", ".join(f"{k}={names[id(v)]}" for k, v in program.outputs.items())
    lines.append(f"  return {{{outs}}}")
    return "\n".join(lines)
