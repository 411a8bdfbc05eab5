"""contract_pairwise: choose a contraction path per tensor network, slice it to a memory cap,
and spell it out as pairwise EINSUM nodes, so nothing is searched at run time.

Strategies are registered by name (opt_einsum's path functions, cotengra when installed, and
our own). Each network's schedule (equation with variances, path, FLOPs, largest intermediate,
sliced indices) is recorded on the resulting program for ``fn.explain()``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import opt_einsum as oe

from hogc.ir import Node, Op, Program, build as B
from hogc.ir.node import Einsum

from .conv import conv_flops, conv_network
from .selection import is_selection, selection_kind, selection_step

__all__ = ["contract_pairwise", "PATH_STRATEGIES", "register_path_strategy", "NetworkSchedule",
           "network_steps", "einsum_flops", "path_flops", "letter_sizes", "MAX_SLICES", "OPTIMAL_MAX_OPERANDS"]

#: The most chunks one network is cut into (the loop is unrolled into the program).
MAX_SLICES = 256
#: 'optimal' searches exhaustively up to this many operands and uses 'dp' beyond.
OPTIMAL_MAX_OPERANDS = 8


def _naive(inputs, output, size_dict, memory_limit=None):
    """Left to right, in the order the passes wrote the operands: ((a b) c) d ..."""
    n = len(inputs)
    return [(0, 1)] + [(0, n - 1 - k) for k in range(1, n - 1)]


PATH_STRATEGIES: dict[str, Callable | str] = {"naive": _naive, "greedy": "greedy", "optimal": "optimal",
                                              "dp": "dp", "auto": "auto"}


def register_path_strategy(name: str, fn: Callable) -> None:
    """Register a path function with opt_einsum's signature ``(inputs, output, size_dict, memory_limit)``."""
    if name in PATH_STRATEGIES:
        raise ValueError(f"path strategy '{name}' is already registered")
    PATH_STRATEGIES[name] = fn


try:  # an optional extra: hyper-optimized contraction trees
    import cotengra as _ctg

    def _cotengra(inputs, output, size_dict, memory_limit=None):
        import warnings

        opt = _ctg.HyperOptimizer(max_repeats=16, progbar=False)
        with warnings.catch_warnings():  # letter sets are unordered; only the path is used
            warnings.simplefilter("ignore", UserWarning)
            return opt(inputs, output, size_dict)

    PATH_STRATEGIES["cotengra"] = _cotengra
except ImportError:  # pragma: no cover - depends on the environment
    pass


@functools.lru_cache(maxsize=4096)
def _path(eq: Einsum, shapes: tuple, strategy: str):
    if strategy not in PATH_STRATEGIES:
        raise ValueError(f"unknown path strategy '{strategy}'; registered: {sorted(PATH_STRATEGIES)}")
    opt = PATH_STRATEGIES[strategy]
    if len(shapes) <= 2:
        return [(0, 1)] if len(shapes) == 2 else [(0,)]
    if opt == "auto" and len(shapes) <= 6:
        opt = "optimal"
    elif opt == "optimal" and len(shapes) > OPTIMAL_MAX_OPERANDS:
        opt = "dp"  # exhaustive search is factorial in the operands; dp is exact on connected networks
    if callable(opt):
        sizes = letter_sizes(eq.inputs, shapes)
        return [tuple(p) for p in opt([set(s) for s in eq.inputs], set(eq.output), sizes, None)]
    path, _ = oe.contract_path(",".join(eq.inputs) + "->" + eq.output, *shapes, shapes=True, optimize=opt)
    return path


def network_steps(inputs, output: str, sizes: dict[str, int], path) -> list[tuple[int, int, str, str, str]]:
    """The pairwise steps of ``path``: (i, j, sa, sb, result) with the result's letters in the
    order ``contract_pairwise`` writes them (the larger operand's layout first)."""
    subs = list(inputs)
    steps = []
    for step in path:
        if len(step) == 1:
            continue
        i, j = sorted(step)
        sa, sb = subs[i], subs[j]
        rest = [s for k, s in enumerate(subs) if k not in (i, j)]
        if not rest:
            out = output
        else:
            keep = set(output) | set("".join(rest))
            first, second = (sa, sb) if _numel(sa, sizes) >= _numel(sb, sizes) else (sb, sa)
            out = "".join(dict.fromkeys(c for c in first + second if c in keep))
        steps.append((i, j, sa, sb, out))
        subs = rest + [out]
    return steps


def letter_sizes(inputs, shapes) -> dict[str, int]:
    """Each einsum letter's extent, from the operands' subscripts and shapes."""
    sizes: dict[str, int] = {}
    for s, shp in zip(inputs, shapes):
        sizes.update(zip(s, shp))
    return sizes


def _numel(s: str, sizes: dict[str, int]) -> int:
    return math.prod(sizes[c] for c in s)


def _private(sa: str, sb: str, out: str) -> str:
    """Letters of ``sa`` summed before the pairwise product: in neither ``sb`` nor ``out``."""
    return "".join(c for c in dict.fromkeys(sa) if c not in sb and c not in out)


def pair_flops(sa: str, sb: str, out: str, sizes: dict[str, int]) -> int:
    """FLOPs of one pairwise step as ``_pair`` builds it: letters private to one operand are summed
    first (one add per element), then the product (multiply-adds counted as 2)."""
    flops = 0
    for s, other in ((sa, sb), (sb, sa)):
        if _private(s, other, out):
            flops += _numel(s, sizes)
    pa, pb = _private(sa, sb, out), _private(sb, sa, out)
    ra = "".join(c for c in sa if c not in pa)
    rb = "".join(c for c in sb if c not in pb)
    return flops + 2 * _numel("".join(dict.fromkeys(ra + rb)), sizes)


def einsum_flops(node: Node) -> int:
    """FLOPs of one emitted EINSUM node: a single-operand sum reads every element once; a pairwise
    product spans the union of its letters (multiply-adds counted as 2)."""
    work = math.prod(letter_sizes(node.arg.inputs, (x.shape for x in node.src)).values())
    return work if len(node.src) == 1 else 2 * work


def _nodes_between(result: Node, operands) -> list[Node]:
    stop = {id(x) for x in operands}
    seen, out, stack = set(), [], [result]
    while stack:
        n = stack.pop()
        if id(n) in seen or id(n) in stop:
            continue
        seen.add(id(n))
        out.append(n)
        stack.extend(n.src)
    return out


def _built_flops(result: Node, operands) -> int:
    """FLOPs of the einsums and convolution kernels that build ``result`` from ``operands`` (each
    distinct node once: chunks as they are, contractions shared by hash-consing counted once)."""
    return sum(einsum_flops(n) if n.op is Op.EINSUM else conv_flops(n)
               for n in _nodes_between(result, operands) if n.op in (Op.EINSUM, Op.CONV))


def path_flops(eq: Einsum, shapes, path) -> int:
    """FLOPs of contracting the network ``eq`` over operands of ``shapes`` along ``path``."""
    return _stats(eq.inputs, eq.output, letter_sizes(eq.inputs, shapes), path)[0]


def _stats(inputs, output, sizes, path) -> tuple[int, int]:
    """(FLOPs, largest intermediate in elements) of a path; the network's result is not an intermediate."""
    flops, largest = 0, 0
    steps = network_steps(inputs, output, sizes, path)
    for k, (_, _, sa, sb, out) in enumerate(steps):
        flops += pair_flops(sa, sb, out, sizes)
        if k < len(steps) - 1:
            largest = max(largest, _numel(out, sizes))
    return flops, largest


def _pair(sa: str, sb: str, out: str, a: Node, b: Node, metric, out_indices) -> Node:
    """One pairwise einsum; a letter private to one operand is summed out of it first, so the
    product never spans it (``sum_o g_no^2 * sum_i x_ni^2``, not a (n, o, i) product)."""
    ops = []
    for s, x, other in ((sa, a, sb), (sb, b, sa)):
        priv = _private(s, other, out)
        if priv:
            kept = "".join(c for c in s if c not in priv)
            x = B.einsum([s], kept, [x], metric=frozenset(metric) & set(priv))
            s = kept
        ops.append((s, x))
    (sa, a), (sb, b) = ops
    for sx, x, sp, p in ((sa, a, sb, b), (sb, b, sa, a)):
        kind = selection_kind(sx, sp, out, p)
        if kind is not None:
            if out_indices is None:
                out_indices = B.einsum([sa, sb], out, [a, b], metric=metric).indices
            return selection_step(sx, sp, out, x, p, kind, out_indices)
    return B.einsum([sa, sb], out, [a, b], metric=metric, out_indices=out_indices)


@dataclass(frozen=True)
class NetworkSchedule:
    """How one tensor network is contracted (one row of ``fn.explain()``)."""

    equation: str  # letters, e.g. "ab,cb->ac"
    legend: str  # each letter's index with its variance, e.g. "a=n.8 b=h0^5 c=h1^4"
    path: tuple[tuple[int, int], ...]  # opt_einsum convention (operands then results appended)
    flops: int  # of the einsums as built (all chunks; contractions shared by hash-consing once)
    largest: int  # largest intermediate of one slice, elements
    itemsize: int
    sliced: tuple[str, ...]  # "letter=index/chunks" for each sliced letter
    slices: int  # number of chunks the network is cut into
    operands: int


def _chunks(size: int, parts: int) -> list[tuple[int, int]]:
    step = -(-size // parts)
    return [(s, min(s + step, size)) for s in range(0, size, step)]


def _choose_slices(eq: Einsum, shapes, path, itemsize: int, cap_bytes: float) -> dict[str, int]:
    """Greedy: halve the letter of the largest intermediate whose halving lowers it most for the
    fewest extra FLOPs, until the largest intermediate fits ``cap_bytes`` (or nothing helps)."""
    sizes = letter_sizes(eq.inputs, shapes)
    parts = {c: 1 for c in sizes}

    def sliced_sizes(p):
        return {c: -(-sizes[c] // p[c]) for c in sizes}

    def cost(p):
        f, big = _stats(eq.inputs, eq.output, sliced_sizes(p), path)
        return big, f * math.prod(p.values())

    big, flops = cost(parts)
    while big * itemsize > cap_bytes:
        best = None
        for c in sizes:
            if parts[c] >= sizes[c]:
                continue
            trial = dict(parts)
            trial[c] = min(sizes[c], parts[c] * 2)
            if math.prod(-(-sizes[k] // -(-sizes[k] // trial[k])) for k in trial) > MAX_SLICES:
                continue
            b2, f2 = cost(trial)
            if b2 < big and (best is None or (b2, f2) < best[0]):
                best = ((b2, f2), trial)
        if best is None:
            break
        (big, flops), parts = best
    return {c: p for c, p in parts.items() if p > 1}


def _letter_legend(eq: Einsum, srcs) -> str:
    seen: dict[str, str] = {}
    for s, x in zip(eq.inputs, srcs):
        for c, ix in zip(s, x.indices):
            seen.setdefault(c, str(ix))
    return " ".join(f"{c}={seen[c]}" for c in sorted(seen))


def _build(eq: Einsum, ops: list[Node], path, out_indices) -> Node:
    subs = list(eq.inputs)
    ops = list(ops)
    sizes = letter_sizes(subs, (x.shape for x in ops))
    for i, j, sa, sb, out in network_steps(eq.inputs, eq.output, sizes, path):
        a, b = ops[i], ops[j]
        last = len(ops) == 2
        r = _pair(sa, sb, out, a, b, eq.metric, out_indices if last else None)
        ops = [o for k, o in enumerate(ops) if k not in (i, j)] + [r]
        subs = [s for k, s in enumerate(subs) if k not in (i, j)] + [out]
    if len(ops) == 1 and (subs[0] != eq.output or ops[0].op is not Op.EINSUM):
        return B.einsum(subs, eq.output, ops, metric=eq.metric, out_indices=out_indices)
    return ops[0]


def _sliced(node: Node, path, parts: dict[str, int]) -> Node:
    """The network cut into chunks along ``parts``' letters: summed letters add their chunks,
    letters of the result concatenate them."""
    eq: Einsum = node.arg
    sizes = letter_sizes(eq.inputs, (x.shape for x in node.src))
    letters = sorted(parts, key=lambda c: c in eq.output)  # summed letters outermost

    def rec(k: int, ops: list[Node]) -> Node:
        if k == len(letters):
            return _build(eq, ops, path, None)
        c = letters[k]
        results = []
        for lo, hi in _chunks(sizes[c], parts[c]):
            cut = [B.slice_(x, s.index(c), lo, hi) if c in s else x for s, x in zip(eq.inputs, ops)]
            results.append(rec(k + 1, cut))
        if c in eq.output:
            d = eq.output.index(c)
            idx = list(results[0].indices)
            idx[d] = node.indices[d]  # the whole index again
            return B.cat(results, d, indices=tuple(idx))
        total = results[0]
        for r in results[1:]:
            total = B.add(total, r)
        return total

    out = rec(0, list(node.src))
    if out.indices != node.indices:  # restore the network's own result indices
        out = B.einsum([eq.output], eq.output, [out], out_indices=node.indices)
    return out


#: Networks of at most this many operands weigh shared first steps (see ``_reuse_path``).
REUSE_MAX_OPERANDS = 4


def _step_key(eq: Einsum, a: Node, sa: str, b: Node, sb: str, out: str) -> Node:
    """What a pairwise step of two original operands computes: the pairwise einsum node itself
    (hash-consing makes equal steps of different networks one node; metric letters and the
    result's letter order are part of it, so steps that would be built apart never count as one)."""
    return _pair(sa, sb, out, a, b, eq.metric, None)


def _detached(eq: Einsum) -> list[bool]:
    """Operands that share no letter with another operand (outer factors such as one-hot
    placements): they are best multiplied in last, and take no part in the reuse search."""
    out = []
    for k, s in enumerate(eq.inputs):
        others = set("".join(t for i, t in enumerate(eq.inputs) if i != k))
        out.append(not (set(s) & others))
    return out


def _outer_last(loose: list[bool]) -> list[tuple[int, int]]:
    """Path steps that multiply the loose (detached) operands together, then the product with the
    one connected result; positions follow opt_einsum's convention (results appended)."""
    items = list(loose)
    steps = []
    while len(items) > 1:
        idx = [k for k, lo in enumerate(items) if lo]
        i, j = (idx[0], idx[1]) if len(idx) >= 2 else sorted((idx[0], items.index(False)))
        steps.append((i, j))
        both_loose = items[i] and items[j]
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [both_loose]
    return steps


def _first_steps(node: Node) -> list[Node]:
    """Every possible first pairwise step among a network's connected operands (their keys)."""
    eq: Einsum = node.arg
    sizes = letter_sizes(eq.inputs, (x.shape for x in node.src))
    core = [k for k, d in enumerate(_detached(eq)) if not d]
    out = []
    for a, i in enumerate(core):
        for j in core[a + 1:]:
            (_, _, sa, sb, res), = network_steps(eq.inputs, eq.output, sizes, [(i, j)])[:1]
            out.append(_step_key(eq, node.src[i], sa, node.src[j], sb, res))
    return out


def _search(node: Node, step_cost) -> list[tuple[int, int]]:
    """Exhaustive path over the connected operands (detached ones last), minimizing the summed
    ``step_cost(i, j, sa, sb, res, orig_i, orig_j)`` (orig: operand positions, None for
    intermediates), then the largest intermediate."""
    eq: Einsum = node.arg
    sizes = letter_sizes(eq.inputs, (x.shape for x in node.src))
    best = None

    def rec(subs, orig, loose, path, cost, big):
        nonlocal best
        if len(subs) - sum(loose) == 1:  # the connected part is contracted: outer factors last,
            if best is None or (cost, big) < best[0]:  # multiplied together first (a scalar each, often)
                best = ((cost, big), path + _outer_last(loose))
            return
        for i in range(len(subs)):
            for j in range(i + 1, len(subs)):
                if loose[i] or loose[j]:
                    continue
                (_, _, sa, sb, res), = network_steps(subs, eq.output, sizes, [(i, j)])[:1]
                f = step_cost(sa, sb, res, orig[i], orig[j], sizes)
                keep = [k for k in range(len(subs)) if k not in (i, j)]
                rec([subs[k] for k in keep] + [res], [orig[k] for k in keep] + [None],
                    [loose[k] for k in keep] + [False], path + [(i, j)], cost + f,
                    max(big, _numel(res, sizes)))

    rec(list(eq.inputs), list(range(len(eq.inputs))), _detached(eq), [], 0.0, 0)
    return best[1]


def _reuse_path(node: Node, counts: dict, built: set) -> list[tuple[int, int]] | None:
    """The exhaustive best path when a first step is shared with other networks: a shared step's
    FLOPs are divided among the networks that can use it (free once built), so
    ``<d_n, U a_n>`` over many ``d`` contracts ``U a`` once. Detached operands come last.
    None when nothing is shared or the connected part is too large to search."""
    eq: Einsum = node.arg
    if not 3 <= _detached(eq).count(False) <= REUSE_MAX_OPERANDS:
        return None
    if not any(counts.get(k, 0) > 1 or k in built for k in _first_steps(node)):
        return None

    def cost(sa, sb, res, oi, oj, sizes):
        f = pair_flops(sa, sb, res, sizes)
        if oi is not None and oj is not None:
            key = _step_key(eq, node.src[oi], sa, node.src[oj], sb, res)
            f = 0 if key in built else f / max(counts.get(key, 1), 1)
        return f

    path = _search(node, cost)
    (i, j) = path[0]
    sizes = letter_sizes(eq.inputs, (x.shape for x in node.src))
    (_, _, sa, sb, res), = network_steps(eq.inputs, eq.output, sizes, [(i, j)])[:1]
    built.add(_step_key(eq, node.src[i], sa, node.src[j], sb, res))
    return path


#: Networks with a selection constant (index pattern) and at most this many connected operands
#: search their path exhaustively with selection steps costed as the elements they move.
SELECTION_MAX_OPERANDS = 6


def _selection_path(node: Node) -> list[tuple[int, int]] | None:
    """Convolution and pooling networks: gathers and scatter-adds through index patterns move
    memory and do no arithmetic, so im2col-like first steps are cheap, not a dense product."""
    eq: Einsum = node.arg
    sel = [is_selection(x) for x in node.src]
    if not any(sel) or not 2 <= _detached(eq).count(False) <= SELECTION_MAX_OPERANDS:
        return None

    def cost(sa, sb, res, oi, oj, sizes):
        for sx, sp, o in ((sa, sb, oj), (sb, sa, oi)):
            if o is not None and sel[o] and selection_kind(sx, sp, res, node.src[o]) is not None:
                return _numel(sx, sizes) + _numel(res, sizes)
        return pair_flops(sa, sb, res, sizes)

    return _search(node, cost)


def contract_pairwise(program: Program, strategy: str = "auto", cap_bytes: float | None = None,
                      itemsize: int = 4) -> Program:
    """Replace every einsum of three or more operands by the pairwise einsums of its path.

    With ``auto``, small networks that can share a first pairwise step with other networks (the
    same two operands contracted the same way) search their path with that step's cost divided
    among them: ``U a`` is contracted once for every ``<d, U a>``. Convolution networks become
    kernel calls (``passes/conv.py``) unless the schedule is 'naive' or sliced; networks holding
    an index pattern search their path with gathers costed as the elements they move.

    Args:
        program: any program.
        strategy: a name in ``PATH_STRATEGIES`` ('naive' keeps the order the passes wrote).
        cap_bytes: slice every network whose largest intermediate exceeds this many bytes.
        itemsize: bytes per element (of the program's floating dtype).

    Returns:
        An equivalent program whose einsums have at most two operands; ``networks`` records each
        network's schedule.

    Raises:
        ValueError: an unknown strategy (the message lists the registered ones).
    """
    counts: dict[Node, int] = {}
    if strategy == "auto":
        for node in program.nodes:
            if node.op is Op.EINSUM and 3 <= _detached(node.arg).count(False) <= REUSE_MAX_OPERANDS:
                for key in dict.fromkeys(_first_steps(node)):  # once per network
                    counts[key] = counts.get(key, 0) + 1
    built: set = set()
    new: dict[int, Node] = {}
    records = []
    for node in program.nodes:
        src = tuple(new[s.uid] for s in node.src)
        n2 = node if src == node.src else node.replace(src=src)
        if n2.op is Op.EINSUM and len(n2.src) >= 2:
            scheduled = _as_convolution(n2, itemsize) if strategy != "naive" and cap_bytes is None else None
            if scheduled is None:
                path = None
                if strategy != "naive":
                    path = _selection_path(node)
                    if path is None and counts:
                        path = _reuse_path(node, counts, built)
                scheduled = _schedule_network(n2, strategy, cap_bytes, itemsize, path)
            n2, record = scheduled
            records.append((n2, record))
        new[node.uid] = n2
    out = Program.of({k: new[v.uid] for k, v in program.outputs.items()})
    return out.with_networks(records)


def _as_convolution(node: Node, itemsize: int) -> tuple[Node, NetworkSchedule] | None:
    """A convolution network as a kernel call (passes/conv.py) with its record, or None."""
    conv = conv_network(node)
    if conv is None:
        return None
    eq: Einsum = node.arg
    return conv, NetworkSchedule(str(eq), _letter_legend(eq, node.src), (), _built_flops(conv, node.src), 0,
                                 itemsize, (), 1, len(node.src))


def _schedule_network(node: Node, strategy: str, cap_bytes: float | None, itemsize: int, path=None
                      ) -> tuple[Node, NetworkSchedule]:
    """One network: its path (``strategy``'s unless given), its slices, the pairwise einsums that
    build it, and their record."""
    eq: Einsum = node.arg
    shapes = tuple(x.shape for x in node.src)
    path = _path(eq, shapes, strategy) if path is None else path
    parts = _choose_slices(eq, shapes, path, itemsize, cap_bytes) if cap_bytes is not None else {}
    sizes = letter_sizes(eq.inputs, shapes)
    chunks = {c: len(_chunks(sizes[c], p)) for c, p in parts.items()}
    _, largest = _stats(eq.inputs, eq.output, {c: -(-sizes[c] // parts.get(c, 1)) for c in sizes}, path)
    built = node
    if len(node.src) > 2 or parts or any(_private(a, b, eq.output) for a, b in (eq.inputs, eq.inputs[::-1])):
        built = _sliced(node, path, parts) if parts else _build(eq, list(node.src), path, node.indices)
    record = NetworkSchedule(str(eq), _letter_legend(eq, node.src), tuple(tuple(p) for p in path),
                             _built_flops(built, node.src), largest, itemsize,
                             tuple(f"{c}/{n}" for c, n in sorted(chunks.items())), math.prod(chunks.values()),
                             len(node.src))
    return built, record
