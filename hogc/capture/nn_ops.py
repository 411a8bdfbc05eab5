"""Lowerings of neural-network layers into IR ops that already have every derivative rule.

* Convolutions and pooling are contractions with 0/1 *index-pattern* tensors P[h, k, o]
  (input position h feeds output o through kernel tap k), one per spatial axis, so the passes
  see them as einsums: per-sample gradients, GGN columns and Kronecker factors follow from the
  einsum rules. Two simplifications avoid patterns: a 1-tap, stride-1 axis is the identity and
  a non-overlapping axis (kernel = stride, no padding or dilation) is a reshape.
* Max pooling is the einsum of the unfolded input with the one-hot of each window's argmax, a
  piecewise-constant function of the input (``NONDIFF``); so is embedding (one-hot of the ids).
* Normalizations, softmax and attention are compositions of means, elementwise functions and
  contractions; softmax subtracts a max held constant, which changes no derivative.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnsupportedOpError
from ..ir import Node, build as B
from ..ir.nondiff import pool_output_size
from .aten import LOWERINGS, _add, _mean, _mul, _sub, _sum, _unary, fresh_indices, lowering

_exp, _log, _rsqrt = _unary("exp"), _unary("log"), _unary("rsqrt")


def _tuple(v, d: int) -> tuple[int, ...]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    return v * d if len(v) == 1 else v


def _const(t: torch.Tensor, tag: str) -> Node:
    return B.const_tensor(t, fresh_indices(t.shape, tag))


def _pattern(size: int, k: int, out: int, stride: int, pad: int, dil: int, dtype) -> torch.Tensor:
    """P[h, t, o] = 1 where input position h is tap t of output window o."""
    P = torch.zeros(size, k, out, dtype=dtype)
    for o in range(out):
        for t in range(k):
            h = o * stride + t * dil - pad
            if 0 <= h < size:
                P[h, t, o] = 1.0
    return P


# --- convolution ----------------------------------------------------------------------------

def _conv(x: Node, w: Node, b, stride, padding, dilation, groups: int, dtype, transposed=False, output_padding=0):
    d = w.ndim - 2
    unbatched = x.ndim == d + 1
    if unbatched:
        raise UnsupportedOpError("convolution of an unbatched input (hogc needs the sample axis first)")
    stride, dilation = _tuple(stride, d), _tuple(dilation, d)
    output_padding = _tuple(output_padding, d)
    N, C, S = x.shape[0], x.shape[1], x.shape[2:]
    K = w.shape[2:]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise UnsupportedOpError("padding='same' with a stride")
            tot = [dl * (k - 1) for dl, k in zip(dilation, K)]
            if any(t % 2 for t in tot):
                raise UnsupportedOpError("padding='same' with an even total padding (asymmetric) is not supported")
            padding = tuple(t // 2 for t in tot)
        else:
            raise UnsupportedOpError(f"convolution padding '{padding}'")
    padding = _tuple(padding, d)
    G = groups
    L = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    n, g, ci, co = next(L), next(L), next(L), next(L)
    if not transposed:  # w: (Cout, Cin/G, *K)
        Cout = w.shape[0]
        xs, ws = B.reshape(x, (N, G, C // G) + S), B.reshape(w, (G, Cout // G, C // G) + K)
    else:  # w: (Cin, Cout/G, *K)
        Cout = w.shape[1] * G
        xs, ws = B.reshape(x, (N, G, C // G) + S), B.reshape(w, (G, C // G, Cout // G) + K)
    xl, wl = [n, g, ci], [g, co, ci] if not transposed else [g, ci, co]
    outl, ops, subs, outs = [n, g, co], [], [], []
    for ax in range(d):
        h, t, o = next(L), next(L), next(L)
        s, k, st, p, dl = S[ax], K[ax], stride[ax], padding[ax], dilation[ax]
        if not transposed:
            out = (s + 2 * p - dl * (k - 1) - 1) // st + 1
            if k == 1 and st == 1 and p == 0:  # dense: the identity
                xl.append(h), wl.append(t), outl.append(h)
                outs.append(s)
                ops.append((None, h + t))  # the kernel's size-1 tap is summed out with the weight
                continue
            P = _pattern(s, k, out, st, p, dl, dtype)
            xl.append(h), wl.append(t), outl.append(o)
            subs.append(h + t + o)
            ops.append((_const(P, "conv"), h + t + o))
        else:
            out = (s - 1) * st - 2 * p + dl * (k - 1) + output_padding[ax] + 1
            P = _pattern(out, k, s, st, p, dl, dtype)  # output position h, tap t, input position o
            xl.append(o), wl.append(t), outl.append(h)
            ops.append((_const(P, "conv"), h + t + o))
        outs.append(out)
    operands, terms = [xs, ws], ["".join(xl), "".join(wl)]
    for c, sub in ops:
        if c is not None:
            operands.append(c), terms.append(sub)
    y = B.einsum(terms, "".join(outl), operands)
    y = B.reshape(y, (N, Cout) + tuple(outs))
    if b is not None:
        y = B.add(y, B.reshape(b, (Cout,) + (1,) * d))
    return y


@lowering("conv1d", "conv2d", "conv3d")
def _conv_nd(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, out_dtype):
    return _conv(x, w, b, stride, padding, dilation, groups, out_dtype)


@lowering("convolution")
def _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups, *, out_dtype):
    return _conv(x, w, b, stride, padding, dilation, groups, out_dtype, transposed, output_padding)


@lowering("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *, out_dtype):
    return _conv(x, w, b, stride, padding, dilation, groups, out_dtype, True, output_padding)


# --- pooling --------------------------------------------------------------------------------

def _spatial(x: Node, d: int) -> tuple[int, ...]:
    if x.ndim < d + 2:
        raise UnsupportedOpError(f"pooling of an input without batch and channel axes (shape {x.shape})")
    return x.shape[-d:]


def _pool_with(x: Node, mats: list[torch.Tensor], extra: list[tuple[Node, str]] = (), taps: bool = False) -> Node:
    """Contract each trailing spatial axis of x with its matrix A[h, o] (or pattern P[h, t, o])."""
    d = len(mats)
    L = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    lead = "".join(next(L) for _ in range(x.ndim - d))
    xs, outs, tl, terms, ops = lead, lead, "", [], []
    for A in mats:
        h, o = next(L), next(L)
        xs += h
        outs += o
        if taps:
            t = next(L)
            tl += t
            terms.append(h + t + o)
        else:
            terms.append(h + o)
        ops.append(_const(A, "pool"))
    extra_terms = [lead + outs[len(lead):] + tl] if extra else []
    return B.einsum([xs] + terms + extra_terms, outs, [x] + ops + [e for e, _ in extra])


def _avg_matrix(size, k, stride, pad, ceil, include_pad, dtype) -> torch.Tensor:
    out = pool_output_size(size, k, stride, pad, 1, ceil)
    A = torch.zeros(size, out, dtype=dtype)
    for o in range(out):
        start = o * stride - pad
        end = min(start + k, size + pad)
        count = end - start
        lo, hi = max(start, 0), min(end, size)
        A[lo:hi, o] = 1.0 / (count if include_pad else hi - lo)
    return A


def _avg_pool(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None,
              *, out_dtype, d):
    S = _spatial(x, d)
    kernel = _tuple(kernel, d)
    stride = _tuple(stride if stride else kernel, d)
    padding = _tuple(padding, d)
    mats = [_avg_matrix(s, k, st, p, ceil_mode, count_include_pad, out_dtype)
            for s, k, st, p in zip(S, kernel, stride, padding)]
    if divisor_override:
        mats = [(A > 0).to(out_dtype) for A in mats]
        mats[0] = mats[0] / divisor_override
    return _pool_with(x, mats)


def _adaptive_matrix(size: int, out: int, dtype) -> torch.Tensor:
    A = torch.zeros(size, out, dtype=dtype)
    for o in range(out):
        lo, hi = (o * size) // out, -(-((o + 1) * size) // out)
        A[lo:hi, o] = 1.0 / (hi - lo)
    return A


def _adaptive_avg(x, output_size, *, out_dtype, d):
    S = _spatial(x, d)
    outs = [s if o is None else o for s, o in zip(S, _tuple(output_size, d))]
    return _pool_with(x, [_adaptive_matrix(s, o, out_dtype) for s, o in zip(S, outs)])


def _max_pool(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False, *, out_dtype, d):
    S = _spatial(x, d)
    kernel = _tuple(kernel, d)
    stride = _tuple(stride if stride else kernel, d)
    padding, dilation = _tuple(padding, d), _tuple(dilation, d)
    params = (kernel, stride, padding, dilation, bool(ceil_mode))
    mask = B.nondiff("window_argmax", params, x)  # (..., *out, *kernel), one-hot per window
    pats = [_pattern(s, k, pool_output_size(s, k, st, p, dl, ceil_mode), st, p, dl, out_dtype)
            for s, k, st, p, dl in zip(S, kernel, stride, padding, dilation)]
    return _pool_with(x, pats, [(mask, "")], taps=True)


def _per_dim(fn, d: int):
    def rule(*a, out_dtype, **k):
        return fn(*a, out_dtype=out_dtype, d=d, **k)
    return rule


for _d in (1, 2, 3):
    lowering(f"avg_pool{_d}d")(_per_dim(_avg_pool, _d))
    lowering(f"adaptive_avg_pool{_d}d")(_per_dim(_adaptive_avg, _d))
    lowering(f"max_pool{_d}d")(_per_dim(_max_pool, _d))
