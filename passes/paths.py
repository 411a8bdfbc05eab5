"""contract_pairwise: choose a contraction path per tensor network and spell it out.

Strategies are registered by name (opt_einsum's path functions and our own); the chosen
path becomes a chain of pairwise EINSUM nodes, so nothing is searched at run time.
"""
from __future__ import annotations

import math
from typing import Callable

import opt_einsum as oe

from hogc.ir import Node, Op, Program, build as B
from hogc.ir.node import Einsum

__all__ = ["contract_pairwise", "PATH_STRATEGIES", "register_path_strategy"]


def _naive(inputs, output, size_dict, memory_limit=None):
    """Left to right, in the order the passes wrote the operands."""
    return [(0, 1)] * (len(inputs) - 1)


PATH_STRATEGIES: dict[str, Callable | str] = {"naive": _naive, "greedy": "greedy", "optimal": "optimal",
                                              "dp": "dp", "auto": "auto"}


def register_path_strategy(name: str, fn: Callable) -> None:
    """Register a path function with opt_einsum's signature ``(inputs, output, size_dict, memory_limit)``."""
    if name in PATH_STRATEGIES:
        raise ValueError(f"path strategy '{name}' is already registered")
    PATH_STRATEGIES[name] = fn


def _path(eq: Einsum, operands, strategy: str):
    if strategy not in PATH_STRATEGIES:
        raise ValueError(f"unknown path strategy '{strategy}'; registered: {sorted(PATH_STRATEGIES)}")
    opt = PATH_STRATEGIES[strategy]
    if len(operands) <= 2:
        return [(0, 1)] if len(operands) == 2 else [(0,)]
    if opt == "auto" and len(operands) <= 6:
        opt = "optimal"
    if callable(opt):
        sizes = {}
        for s, x in zip(eq.inputs, operands):
            sizes.update(zip(s, x.shape))
        return opt([set(s) for s in eq.inputs], set(eq.output), sizes, None)
    path, _ = oe.contract_path(",".join(eq.inputs) + "->" + eq.output, *[x.shape for x in operands],
                               shapes=True, optimize=opt)
    return path


def _split(node: Node, strategy: str) -> Node:
    eq: Einsum = node.arg
    ops = list(node.src)
    subs = list(eq.inputs)
    path = _path(eq, ops, strategy)
    for step in path:
        if len(step) == 1:
            continue
        i, j = sorted(step)
        a, b = ops[i], ops[j]
        sa, sb = subs[i], subs[j]
        rest = [s for k, s in enumerate(subs) if k not in (i, j)]
        if len(rest) == 0:
            out = eq.output
            out_idx = node.indices
        else:
            keep = set(eq.output) | set("".join(rest))
            # the larger operand's layout first: elementwise products then stream through memory
            first, second = (sa, sb) if math.prod(a.shape) >= math.prod(b.shape) else (sb, sa)
            out = "".join(dict.fromkeys(c for c in first + second if c in keep))
            out_idx = None
        r = B.einsum([sa, sb], out, [a, b], metric=eq.metric, out_indices=out_idx)
        ops = [o for k, o in enumerate(ops) if k not in (i, j)] + [r]
        subs = rest + [out]
    if len(ops) == 1 and (subs[0] != eq.output or ops[0].op is not Op.EINSUM):
        return B.einsum(subs, eq.output, ops, metric=eq.metric, out_indices=node.indices)
    return ops[0]


def contract_pairwise(program: Program, strategy: str = "auto") -> Program:
    """Replace every einsum of three or more operands by the pairwise einsums of its path.

    Args:
        program: any program.
        strategy: a name in ``PATH_STRATEGIES`` ('naive' keeps the order the passes wrote).

    Returns:
        An equivalent program whose einsums have at most two operands.

    Raises:
        ValueError: an unknown strategy (the message lists the registered ones).
    """
    new: dict[int, Node] = {}
    for node in program.nodes:
        src = tuple(new[s.uid] for s in node.src)
        n2 = node if src == node.src else node.replace(src=src)
        if n2.op is Op.EINSUM and len(n2.src) > 2:
            n2 = _split(n2, strategy)
        new[node.uid] = n2
    return Program.of({k: new[v.uid] for k, v in program.outputs.items()})
