"""The ATen lowering table: one entry per traced ATen op, building IR nodes with builders.

Indices are provisional here; the ``infer_indices`` pass assigns spaces and variances.
A rule receives the op's arguments (IR nodes for tensors, Python values otherwise) and,
if it names them, ``out_shape`` (torch's shape for the result), ``out_dtype`` and ``op_name``
(the ATen name, an in-place op's trailing underscore removed).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx

from ..errors import UnsupportedOpError
from ..ir import Index, Node, Op, Variance, build as B

__all__ = ["LOWERINGS", "IDENTITY", "VIEW_OPS", "FACTORIES", "supported_ops", "fresh_indices"]

LOWERINGS: dict[str, Callable] = {}
#: ATen ops whose result may alias their first argument (in-place ops must not mutate a live alias).
VIEW_OPS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as", "t", "transpose", "swapaxes", "permute", "movedim", "expand", "expand_as", "slice",
            "narrow", "select", "split", "split_with_sizes", "chunk", "unbind", "alias", "detach", "getitem"}
#: Factories: evaluated at capture into constants.
FACTORIES = {"ones", "zeros", "full", "arange", "eye", "ones_like", "zeros_like", "full_like", "tensor", "linspace"}
#: ATen ops that are the identity for hogc (copies, aliases).
IDENTITY = {"clone", "contiguous", "alias", "lift_fresh_copy", "detach_"}


def lowering(*names: str):
    def deco(fn):
        for n in names:
            if n in LOWERINGS:
                raise ValueError(f"lowering for '{n}' registered twice")
            LOWERINGS[n] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    return sorted(set(LOWERINGS) | IDENTITY | FACTORIES)


def fresh_indices(shape, tag: str) -> tuple[Index, ...]:
    return tuple(Index(f"{tag}.{k}", s, f"{tag}.{k}", Variance.UP) for k, s in enumerate(shape))


def _c(v) -> Node:
    return v if isinstance(v, Node) else B.const(v)


# --- contractions ---------------------------------------------------------------

def _matmul(a: Node, b: Node) -> Node:
    if a.ndim == 0 or b.ndim == 0:
        raise UnsupportedOpError("matmul of a 0-d tensor")
    L = B.letters(64)
    k, i, j = L[0], L[1], L[2]
    if a.ndim == 1 and b.ndim == 1:
        return B.einsum([k, k], "", [a, b])
    sa = k if a.ndim == 1 else i + k
    sb = k if b.ndim == 1 else k + j
    ba, bb = a.shape[:-2], b.shape[:-2]
    n = max(len(ba), len(bb))
    pa, pb, out = "", "", ""
    for d in range(n):
        da = ba[d - n + len(ba)] if d - n + len(ba) >= 0 else None
        db = bb[d - n + len(bb)] if d - n + len(bb) >= 0 else None
        la, lb = L[3 + 2 * d], L[4 + 2 * d]
        if da is not None and db is not None and da == db:
            lb = la
        if da is not None:
            pa += la
        if db is not None:
            pb += lb
        out += la if (da is not None and (db is None or da != 1 or db == 1)) else lb
    o = out + ("" if a.ndim == 1 else i) + ("" if b.ndim == 1 else j)
    return B.einsum([pa + sa, pb + sb], o, [a, b])


@lowering("linear")
def _linear(x, w, b=None):
    L = B.letters(x.ndim + 1)
    lead, i, o = L[: x.ndim - 1], L[x.ndim - 1], L[x.ndim]
    y = B.einsum([lead + i, o + i], lead + o, [x, w])
    return y if b is None else B.add(y, b)


@lowering("matmul", "mm", "bmm")
def _mm(a, b):
    return _matmul(a, b)


@lowering("addmm")
def _addmm(c, a, b, beta=1, alpha=1):
    return B.add(B.scale(c, beta), B.scale(_matmul(a, b), alpha))


@lowering("einsum")
def _einsum(eq: str, operands, path=None):
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    used = set(lhs.replace(".", ""))
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    ell_n = max((x.ndim - len(t.replace("...", "")) for t, x in zip(terms, operands) if "..." in t), default=0)
    ell = "".join(free[:ell_n])
    terms = [t.replace("...", ell[len(ell) - (x.ndim - len(t.replace("...", ""))):] if "..." in t else "")
             for t, x in zip(terms, operands)]
    if "->" in eq:
        out = rhs.replace("...", ell)
    else:
        counts = {c: "".join(terms).count(c) for c in set("".join(terms))}
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    for t in terms:
        if len(set(t)) != len(t):
            raise UnsupportedOpError(f"einsum '{eq}' takes a diagonal (repeated index within one operand)")
    return B.einsum(terms, out, list(operands))


# --- elementwise -----------------------------------------------------------------

def _unary(fname: str, *params):
    return lambda x, *a: B.elementwise(fname, 0, params, x)


for _n in ("exp", "log", "sqrt", "rsqrt", "abs", "reciprocal", "sin", "cos", "relu", "sigmoid",
           "tanh", "silu", "neg"):
    lowering(_n)(_unary(_n))
lowering("log_sigmoid")(_unary("logsigmoid"))
lowering("selu")(_unary("elu", 1.6732632423543772, 1.0507009873554805, 1.0))


@lowering("leaky_relu")
def _leaky(x, slope=0.01):
    return B.elementwise("leaky_relu", 0, (float(slope),), x)


@lowering("elu")
def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    return B.elementwise("elu", 0, (float(alpha), float(scale), float(input_scale)), x)


@lowering("celu")
def _celu(x, alpha=1.0):
    return B.elementwise("elu", 0, (float(alpha), 1.0, 1.0 / float(alpha)), x)


@lowering("softplus")
def _softplus(x, beta=1.0, threshold=20.0):
    return B.elementwise("softplus", 0, (float(beta), float(threshold)), x)


@lowering("gelu")
def _gelu(x, approximate="none"):
    return B.elementwise("gelu" if approximate == "none" else "gelu_tanh", 0, (), x)


@lowering("pow")
def _pow(x, p):
    if isinstance(x, Node) and not isinstance(p, Node):
        return x if p == 1 else B.elementwise("pow", 0, (float(p),), x)
    raise UnsupportedOpError("pow with a tensor exponent")


@lowering("clamp", "clip")
def _clamp(x, lo=None, hi=None):
    if isinstance(lo, Node) or isinstance(hi, Node):
        raise UnsupportedOpError("clamp with tensor bounds")
    lo = float("-inf") if lo is None else float(lo)
    hi = float("inf") if hi is None else float(hi)
    return B.elementwise("clamp", 0, (lo, hi), x)


@lowering("hardtanh")
def _hardtanh(x, lo=-1.0, hi=1.0):
    return B.elementwise("clamp", 0, (float(lo), float(hi)), x)


@lowering("addcmul")
def _addcmul(a, b, c, value=1):
    return B.add(_c(a), B.scale(B.mul(_c(b), _c(c)), value))


@lowering("flip")
def _flip(x, dims):
    for d in dims:
        x = B.index(x, d, tuple(range(x.shape[d] - 1, -1, -1)))
    return x


@lowering("square")
def _square(x):
    return B.elementwise("pow", 0, (2.0,), x)


@lowering("add")
def _add(a, b, alpha=1):
    return B.add(_c(a), B.scale(_c(b), alpha) if alpha != 1 else _c(b))


@lowering("sub")
def _sub(a, b, alpha=1):
    return B.sub(_c(a), B.scale(_c(b), alpha) if alpha != 1 else _c(b))


@lowering("rsub")
def _rsub(a, b, alpha=1):
    return B.sub(_c(b), B.scale(_c(a), alpha) if alpha != 1 else _c(a))


@lowering("mul")
def _mul(a, b):
    return B.mul(_c(a), _c(b))


@lowering("div")
def _div(a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise UnsupportedOpError(f"div with rounding_mode='{rounding_mode}' is not differentiable")
    if not isinstance(b, Node):
        return B.scale(a, 1.0 / b)
    return B.div(_c(a), b)


# --- reductions ---------------------------------------------------------------------

def _keep(x: Node, y: Node, dims, keepdim: bool) -> Node:
    if not keepdim:
        return y
    dims = {d % x.ndim for d in dims}
    shape = [1 if k in dims else s for k, s in enumerate(x.shape)]
    return B.reshape(y, shape)


@lowering("sum")
def _sum(x, dims=None, keepdim=False, dtype=None):
    dims = list(range(x.ndim)) if dims is None or dims == [] else list(dims)
    return _keep(x, B.sum_dims(x, dims), dims, keepdim)


@lowering("mean")
def _mean(x, dims=None, keepdim=False, dtype=None):
    dims = list(range(x.ndim)) if dims is None or dims == [] else list(dims)
    count = math.prod(x.shape[d] for d in dims)
    return B.scale(_keep(x, B.sum_dims(x, dims), dims, keepdim), 1.0 / count)


# --- shape ----------------------------------------------------------------------------

@lowering("view", "reshape", "_unsafe_view")
def _reshape(x, shape, *, out_shape):
    return B.reshape(x, out_shape)


@lowering("flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
def _reshape_like(x, *a, out_shape):
    return B.reshape(x, out_shape)


@lowering("t", "transpose", "swapaxes", "swapdims", "permute", "movedim", "numpy_T", "mT")
def _perm(x, *a, op_name):
    name = op_name
    if name == "permute":
        perm = list(a[0])
    else:
        perm = list(range(x.ndim))
        if name in ("t", "numpy_T"):
            perm = perm[::-1]
        elif name == "mT":
            perm[-2], perm[-1] = perm[-1], perm[-2]
        elif name == "movedim":
            src, dst = a
            src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
            src, dst = [s % x.ndim for s in src], [d % x.ndim for d in dst]
            rest = [p for p in perm if p not in src]
            perm = [None] * x.ndim
            for s, d in zip(src, dst):
                perm[d] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
        else:
            d0, d1 = a[0] % x.ndim, a[1] % x.ndim
            perm[d0], perm[d1] = perm[d1], perm[d0]
    return B.permute(x, perm)


@lowering("expand")
def _expand(x, shape, implicit=False, *, out_shape):
    return B.expand(x, out_shape)


@lowering("expand_as")
def _expand_as(x, other, *, out_shape):
    return B.expand(x, out_shape)


@lowering("slice")
def _slice(x, dim=0, start=None, end=None, step=1):
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else min(end, n)
    return B.slice_(x, dim, start, end, step)


@lowering("narrow")
def _narrow(x, dim, start, length):
    return B.slice_(x, dim, start, start + length, 1)


@lowering("select")
def _select(x, dim, i):
    dim %= x.ndim
    i %= x.shape[dim]
    y = B.slice_(x, dim, i, i + 1, 1)
    return B.reshape(y, x.shape[:dim] + x.shape[dim + 1:])


def _checked_index(x: Node, dim: int, idx: tuple[int, ...]) -> Node:
    try:
        return B.index(x, dim, idx)
    except IndexError as e:
        raise UnsupportedOpError(f"constant index out of range: {e}") from None


def _const_index(idx: Node) -> tuple[int, ...]:
    t = idx.arg.tensor
    if t.dtype == torch.bool:
        t = t.nonzero().flatten()
    if t.ndim != 1:
        raise UnsupportedOpError("indexing with a multi-dimensional constant index tensor")
    return tuple(int(v) for v in t.tolist())


def _is_const(idx) -> bool:
    return isinstance(idx, Node) and idx.op is Op.CONST and not isinstance(idx.arg, (int, float))


def _runtime_select(x: Node, dim: int, idx: Node) -> Node:
    """``x`` indexed along ``dim`` by a runtime index tensor (a buffer, integer inputs, ...) of any
    shape I: ``x.shape[:dim] + I + x.shape[dim+1:]``, one GATHER. Leading axes of I broadcast x
    (an embedding lookup W[ids] keeps the sample axis of ids)."""
    dim %= x.ndim
    head, tail = x.shape[:dim], x.shape[dim + 1:]
    if dim == 0 and idx.ndim == 1:  # table[ids] with one id per sample: the ids' axis must broadcast, not gather
        out = _runtime_select(x, 0, B.reshape(idx, idx.shape + (1,)))
        return B.reshape(out, idx.shape + tail)
    I = idx.shape if idx.ndim else (1,)
    idx = B.nondiff("wrap_index", (x.shape[dim],), idx)
    xe = B.reshape(x, head + (1,) * (len(I) - 1) + (x.shape[dim],) + tail)
    xe = B.expand(xe, head + I[:-1] + (x.shape[dim],) + tail)
    out = B.gather(xe, B.reshape(idx, I + (1,) * len(tail)), -len(tail) - 1)
    return out if idx.ndim else B.reshape(out, head + tail)


@lowering("index")
def _index(x, indices):
    real = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(real) != 1:
        raise UnsupportedOpError("advanced indexing with more than one index tensor")
    d, i = real[0]
    return _checked_index(x, d, _const_index(i)) if _is_const(i) else _runtime_select(x, d, i)


@lowering("index_select")
def _index_select(x, dim, idx):
    return _checked_index(x, dim, _const_index(idx)) if _is_const(idx) else _runtime_select(x, dim, idx)


@lowering("gather")
def _gather(x, dim, idx, sparse_grad=False):
    """torch.gather: ``out[p] = x[p with axis dim replaced by idx[p]]``, out shaped like idx."""
    dim %= x.ndim
    if idx.ndim != x.ndim:
        raise UnsupportedOpError(f"gather with an index of {idx.ndim} axes into a tensor of {x.ndim}")
    for k, (a, b) in enumerate(zip(idx.shape, x.shape)):
        if k != dim and a > b:
            raise UnsupportedOpError(f"gather index size {a} exceeds the input's {b} on axis {k}")
        if k != dim and a < b:
            x = B.slice_(x, k, 0, a, 1)
    if _is_const(idx):
        idx = B.const_tensor(idx.arg.tensor.long(), idx.indices)
    return B.gather(x, idx, dim - x.ndim)


@lowering("cat", "concat", "concatenate")
def _cat(xs, dim=0):
    xs = [x for x in xs if not (x.ndim == 1 and x.shape[0] == 0)]
    return B.cat(xs, dim)


@lowering("stack")
def _stack(xs, dim=0):
    return B.cat([B.unsqueeze(x, dim) for x in xs], dim)


@lowering("split", "split_with_sizes", "chunk", "unbind")
def _split(x, arg=None, dim=0, *, op_name):
    name = op_name
    if name == "unbind":
        dim = 0 if arg is None else arg
    dim %= x.ndim
    n = x.shape[dim]
    if name == "unbind":
        return [B.reshape(B.slice_(x, dim, i, i + 1), x.shape[:dim] + x.shape[dim + 1:]) for i in range(n)]
    if name == "chunk":
        size = -(-n // arg)
        sizes = [min(size, n - s) for s in range(0, n, size)]
    elif isinstance(arg, int):
        sizes = [min(arg, n - s) for s in range(0, n, arg)]
    else:
        sizes = list(arg)
    out, s = [], 0
    for sz in sizes:
        out.append(B.slice_(x, dim, s, s + sz))
        s += sz
    return out


@lowering("dropout")
def _dropout(x, p, train, site):
    """Eval: the identity. Train: x times this call's random mask (from the call's seed and the
    site's own stream), a constant of the derivatives, so every quantity of one call sees the same
    mask and two dropout sites draw different ones."""
    if not train or p == 0:
        return x
    if p >= 1:
        return B.scale(x, 0.0)
    from ..emit.random import stream_of
    return B.mul(x, B.nondiff("dropout_mask", (float(p), stream_of(site)), x, B.inp("rng", "seed", ())))


@lowering("detach")
def _detach(x):
    return x  # checked below: only allowed where nothing depends on parameters


@lowering("_to_copy", "to", "type_as")
def _to(x, *a, out_dtype, **kw):
    return x
from . import nn_ops  # noqa: E402,F401  (registers the layer lowerings)
