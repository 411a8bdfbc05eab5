"""emit: IR program -> torch.fx GraphModule with readable generated source.

One emitter per op (a table keyed by op). Pairwise contractions become ``torch.einsum``
calls with ASCII letters; elementwise derivatives call the sympy-generated functions.
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx

from hogc.passes import elementwise as E
from hogc.passes.paths import letter_sizes

from ..ir import Constant, Node, Op, Program
from ..ir.nondiff import NONDIFF_FUNCTIONS
from . import runtime as R
from .contract import batched_product, in_place_plan, larger

__all__ = ["emit", "EMITTERS"]

EMITTERS: dict[Op, Callable] = {}
_ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def emitter(*ops: Op):
    def deco(fn):
        for op in ops:
            EMITTERS[op] = fn
        return fn
    return deco


def _fn(g: torch.fx.Graph, target, *args):
    return g.call_function(target, tuple(args))


@emitter(Op.ELEMENTWISE)
def _elementwise(g, node, args, gm):
    fname, order, params = node.arg
    if order == 0:
        return _fn(g, E.derivative(fname, 0), args[0], *params)
    y = args[1] if len(args) > 1 else None
    return _fn(g, E.derivative(fname, order), args[0], y, *params)


_BIN = {Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul, Op.DIV: operator.truediv}


@emitter(Op.ADD, Op.SUB, Op.MUL, Op.DIV)
def _binary(g, node, args, gm):
    return _fn(g, _BIN[node.op], *args)


def accumulators(program: Program) -> set[int]:
    """ADD nodes that may run in place on their first operand: it is a fresh result (a pairwise
    contraction or another accumulation) of the same shape, read by nothing else and not
    returned. Summed slices then accumulate into one buffer."""
    users = program.use_counts(outputs=False)
    outs = {o.uid for o in program.outputs.values()}
    acc: set[int] = set()
    for n in program.nodes:
        if n.op is not Op.ADD:
            continue
        a, b = n.src
        fresh = (a.op is Op.EINSUM and len(a.src) == 2) or a.uid in acc
        if fresh and a is not b and a.shape == n.shape and users.get(a.uid) == 1 and a.uid not in outs:
            acc.add(n.uid)
    return acc


#: a contraction over fewer elements than this, next to shared batch letters, runs as
#: multiply-then-sum: torch.einsum would lower it to a bmm over tiny matrices.
SMALL_CONTRACTION = 32


def _size(node: Node) -> dict[str, int]:
    return letter_sizes(node.arg.inputs, (x.shape for x in node.src))


def _mul_sum(g, node, args):
    """Emit a pairwise einsum as broadcast multiply and sum (Hadamard products, squares)."""
    eq = node.arg
    (sa, sb), out = eq.inputs, eq.output
    big, small = (sa, sb) if math.prod(node.src[0].shape) >= math.prod(node.src[1].shape) else (sb, sa)
    order = list(dict.fromkeys(big + small))  # the larger operand keeps its layout
    sizes = _size(node)

    def align(v, s):
        perm = [s.index(c) for c in order if c in s]
        if perm != list(range(len(s))):
            v = _fn(g, torch.permute, v, perm)
        shape = [sizes[c] if c in s else 1 for c in order]
        if len(shape) != len(s):
            v = _fn(g, torch.reshape, v, shape)
        return v

    v = _fn(g, operator.mul, align(args[0], sa), align(args[1], sb))
    return _reduce_to(g, v, "".join(order), out)


def _reduce_to(g, v, have: str, out: str):
    """Sum the letters of ``have`` missing from ``out``, then permute to ``out``'s order."""
    summed = [k for k, c in enumerate(have) if c not in out]
    if summed:
        v = _fn(g, torch.sum, v, summed)
    rest = [c for c in have if c in out]
    if rest != list(out):
        v = _fn(g, torch.permute, v, [rest.index(c) for c in out])
    return v


def prefers_mul_sum(node: Node) -> bool:
    """Whether a pairwise einsum is emitted as broadcast multiply then sum (the memory model reads it)."""
    eq = node.arg
    if len(eq.inputs) != 2:
        return False
    sizes = _size(node)
    shared = set(eq.inputs[0]) & set(eq.inputs[1])
    contracted = [c for c in shared if c not in eq.output]
    batch = [c for c in shared if c in eq.output]
    k = 1
    for c in contracted:
        k *= sizes[c]
    no_reuse = set(eq.inputs[0]) <= shared or set(eq.inputs[1]) <= shared  # a product with no matrix
    full = math.prod(sizes.values())  # the broadcast product multiply-then-sum materializes
    small = full <= 2 * max(math.prod(node.shape), *(math.prod(x.shape) for x in node.src))
    return small and (not contracted or no_reuse or bool(batch and k < SMALL_CONTRACTION))


def _sum_permute(g, node, args):
    """A one-operand einsum: sum the missing letters, then order the rest."""
    return _reduce_to(g, args[0], node.arg.inputs[0], node.arg.output)


def _matmul_form(node: Node):
    """(free letters of a, free letters of b, contracted letters) if the pairwise einsum is a
    matrix product (no batch letters, nothing summed on one side alone), else None."""
    (sa, sb), out = node.arg.inputs, node.arg.output
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None
    shared = set(sa) & set(sb)
    con = [c for c in sa if c in shared]
    if not con or any(c in out for c in shared) or any(c not in out for c in set(sa) ^ set(sb)):
        return None
    return [c for c in sa if c not in shared], [c for c in sb if c not in shared], con


def _as_matmul(g, node, args):
    """A pairwise einsum with no batch letters and nothing summed on one side alone is a
    matrix product: permute to (free, contracted) x (contracted, free), reshape, ``mm``.
    Returns None if the einsum has another form."""
    form = _matmul_form(node)
    if form is None:
        return None
    (sa, sb), out = node.arg.inputs, node.arg.output
    fa, fb, con = form
    sizes = _size(node)

    def mat(v, s, first, second):
        perm = [s.index(c) for c in first + second]
        if perm != list(range(len(s))):
            v = _fn(g, torch.permute, v, perm)
        rows = 1
        for c in first:
            rows *= sizes[c]
        if len(first) != 1 or len(second) != 1:
            v = _fn(g, torch.reshape, v, [rows, -1])
        return v

    v = _fn(g, torch.mm, mat(args[0], sa, fa, con), mat(args[1], sb, con, fb))
    order = fa + fb
    if len(order) != 2:
        v = _fn(g, torch.reshape, v, [sizes[c] for c in order])
    if order != list(out):
        v = _fn(g, torch.permute, v, [order.index(c) for c in out])
    return v


def einsum_transient(node: Node) -> int:
    """Elements an EINSUM's emitted code allocates besides its result while it runs (the
    memory model reads this): the full broadcast product of multiply-then-sum, operand copies
    when a permutation must be flattened for ``mm``, and torch.einsum's operand copies."""
    if len(node.src) == 1:
        return 0
    sizes = _size(node)
    out = math.prod(node.shape)
    sa, sb = node.arg.inputs
    if prefers_mul_sum(node):
        full = math.prod(sizes[c] for c in dict.fromkeys(sa + sb))
        return full if full > out else 0
    form = _matmul_form(node) if len(node.src) == 2 else None
    if form is not None:
        fa, fb, con = form
        extra = 0
        for s, first, second, x in ((sa, fa, con, node.src[0]), (sb, con, fb, node.src[1])):
            perm = [s.index(c) for c in first + second]
            if perm != list(range(len(s))) and (len(first) != 1 or len(second) != 1):
                extra += math.prod(x.shape)
        return extra
    if len(node.src) == 2 and not _has_diagonal(node.arg):
        # the plan reads the larger operand's strides; the smaller one is counted as copied
        metas = [torch.empty(x.shape, device="meta") for x in node.src]
        big = larger(*metas)
        metas[big] = _meta(node.src[big])
        if metas[big] is not None and in_place_plan(_text(node.arg), *metas) is not None:
            return min(math.prod(x.shape) for x in node.src)
    return sum(math.prod(x.shape) for x in node.src)


def reshape_copies(node: Node) -> bool:
    """Whether a RESHAPE's emitted ``torch.reshape`` copies: a permuted, broadcast or windowed view
    to a new shape (torch cannot view it); to its own shape it is a view."""
    src = node.src[0]
    return src.op in (Op.PERMUTE, Op.EXPAND, Op.WINDOWS) and math.prod(node.shape) > 1 and node.shape != src.shape


def _has_diagonal(eq) -> bool:
    """A letter twice in one operand ('aa->'): a trace, not a sum."""
    return any(len(set(s)) < len(s) for s in eq.inputs)


def _contiguous(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _strides(node: Node) -> tuple[int, ...] | None:
    """The strides the emitted code gives ``node``'s tensor, as far as the IR tells: allocating ops
    write contiguous tensors in index order, slices and permutations view their source, a
    reshape keeps a contiguous source contiguous and copies a permuted, broadcast or windowed one
    (as the memory model counts it); None for the rest (broadcasts, windows, other reshapes)."""
    if node.op is Op.SLICE:
        src = _strides(node.src[0])
        if src is None:
            return None
        dim, _, _, step = node.arg
        return src[:dim] + (src[dim] * step,) + src[dim + 1:]
    if node.op is Op.PERMUTE:
        src = _strides(node.src[0])
        return None if src is None else tuple(src[k] for k in node.arg)
    if node.op is Op.RESHAPE:
        src = node.src[0]
        if node.shape == src.shape:
            return _strides(src)
        return _contiguous(node.shape) if reshape_copies(node) or _strides(src) == _contiguous(src.shape) else None
    if node.op in (Op.EXPAND, Op.WINDOWS):
        return None
    return _contiguous(node.shape)


def _meta(node: Node) -> torch.Tensor | None:
    st = _strides(node)
    return None if st is None else torch.empty_strided(node.shape, st, device="meta")


def _text(eq) -> str:
    """An Einsum as torch.einsum's equation text (at most 52 letters)."""
    letters = dict.fromkeys("".join(eq.inputs) + eq.output)
    if len(letters) > len(_ASCII):
        raise ValueError(f"einsum with {len(letters)} indices exceeds torch.einsum's 52 letters")
    m = dict(zip(letters, _ASCII))
    return ",".join("".join(m[c] for c in s) for s in eq.inputs) + "->" + "".join(m[c] for c in eq.output)


@emitter(Op.EINSUM)
def _einsum(g, node, args, gm):
    diagonal = _has_diagonal(node.arg)
    if len(node.src) == 1 and not diagonal:
        return _sum_permute(g, node, args)
    if not diagonal and prefers_mul_sum(node):
        return _mul_sum(g, node, args)
    if len(node.src) == 2 and not diagonal:
        v = _as_matmul(g, node, args)
        if v is not None:
            return v
    text = _text(node.arg)
    if len(node.src) == 2 and not diagonal:  # batched: keeps a straddling operand in place (emit/contract.py)
        return _fn(g, batched_product, text, *args)
    return _fn(g, torch.einsum, text, *args)


@emitter(Op.SUM)
def _sum(g, node, args, gm):
    return _fn(g, torch.sum, args[0], list(node.arg))


@emitter(Op.RESHAPE)
def _reshape(g, node, args, gm):
    return _fn(g, torch.reshape, args[0], list(node.arg))


@emitter(Op.PERMUTE)
def _permute(g, node, args, gm):
    return _fn(g, torch.permute, args[0], list(node.arg))


@emitter(Op.EXPAND)
def _expand(g, node, args, gm):
    return g.call_method("expand", (args[0], list(node.arg)))


_STRUCTURAL = {Op.SLICE: R.slice_dim, Op.PAD: R.pad_dim, Op.INDEX: R.index_dim, Op.INDEX_ADD: R.index_add_dim}


@emitter(*_STRUCTURAL)
def _structural(g, node, args, gm):
    return _fn(g, _STRUCTURAL[node.op], args[0], *node.arg)


@emitter(Op.WINDOWS)
def _windows(g, node, args, gm):
    return _fn(g, R.windows, args[0], *node.arg)


@emitter(Op.SQUARE_PRODUCT)
def _square_product(g, node, args, gm):
    from .square_kernel import equations  # registers torch.ops.hogc.square_product
    return _fn(g, torch.ops.hogc.square_product.default, *args, *equations(*node.arg[:2]))


@emitter(Op.GATHER)
def _gather(g, node, args, gm):
    return _fn(g, R.gather, *args, node.arg)


@emitter(Op.SCATTER_ADD)
def _scatter_add(g, node, args, gm):
    return _fn(g, R.scatter_add, *args, *node.arg)


@emitter(Op.NONDIFF)
def _nondiff(g, node, args, gm):
    fname, params = node.arg
    return _fn(g, NONDIFF_FUNCTIONS[fname].run, *args, *params)


@emitter(Op.CAT)
def _cat(g, node, args, gm):
    return _fn(g, torch.cat, list(args), node.arg)


@emitter(Op.LOSS)
def _loss(g, node, args, gm):
    return _fn(g, R.loss_value, *args, *node.arg.runtime_args())


@emitter(Op.LOSS_GRAD)
def _loss_grad(g, node, args, gm):
    return _fn(g, R.loss_grad, *args, *node.arg.runtime_args())


@emitter(Op.LOSS_SQRT_HESSIAN)
def _loss_sqrt(g, node, args, gm):
    return _fn(g, R.loss_sqrt_hessian, *args, *node.arg.runtime_args(), node.shape[0])


@emitter(Op.LOSS_SQRT_HESSIAN_JVP)
def _loss_sqrt_jvp(g, node, args, gm):
    return _fn(g, R.loss_sqrt_hessian_jvp, *args, *node.arg.runtime_args(), node.shape[1])


@emitter(Op.LOSS_SQRT_HESSIAN_MC)
def _loss_mc(g, node, args, gm):
    spec, m = node.arg
    kind, reduction, *extra = spec.runtime_args()
    return _fn(g, R.loss_sqrt_hessian_mc, *args, kind, reduction, m, *extra)


@emitter(Op.CONV)
def _conv(g, node, args, gm):
    return _fn(g, R.conv, *args, *node.arg)


@emitter(Op.EIGVALSH)
def _eigvalsh(g, node, args, gm):
    return _fn(g, R.top_eigenvalues, args[0], node.arg)


@emitter(Op.CONST)
def _const(g, node, args, gm):
    if not isinstance(node.arg, Constant):
        return node.arg
    name = f"const{len(gm._buffers)}"
    gm.register_buffer(name, node.arg.tensor)
    return g.get_attr(name)


def emit(program: Program, inputs: list[tuple[str, str]]) -> torch.fx.GraphModule:
    """Emit ``program``; the module's positional arguments are the INPUT nodes ``inputs``
    (role, name) in that order; it returns a tuple of the outputs in ``program.outputs`` order."""
    g = torch.fx.Graph()
    root = torch.nn.Module()
    env: dict[int, object] = {}
    ph = {}
    prefix = {"param": "p_", "buffer": "b_", "vector": "v_", "direction": "d_"}  # names like "0.weight" are not identifiers
    for role, name in inputs:
        safe = prefix.get(role, "") + "".join(c if c.isalnum() else "_" for c in name)
        ph[(role, name)] = g.placeholder(safe)
    inplace = accumulators(program)
    for node in program.nodes:
        if node.op is Op.INPUT:
            env[node.uid] = ph[node.arg]
            continue
        args = [env[s.uid] for s in node.src]
        if node.uid in inplace:
            env[node.uid] = g.call_method("add_", tuple(args))
            continue
        env[node.uid] = EMITTERS[node.op](g, node, args, root)
    outs = []
    for out in program.outputs.values():
        v = env[out.uid]
        outs.append(v)
    g.output(tuple(outs))
    return torch.fx.GraphModule(root, g, class_name="HogcProgram")
