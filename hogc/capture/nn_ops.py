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
from ..ir import Constant, Node, Op, build as B
from ..ir.nondiff import pool_output_size
from .aten import _add, _mean, _mul, _sub, _sum, _unary, fresh_indices, lowering

_exp, _log, _rsqrt = _unary("exp"), _unary("log"), _unary("rsqrt")


def _tuple(v, d: int) -> tuple[int, ...]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    return v * d if len(v) == 1 else v


def _const(t: torch.Tensor, tag: str, pattern: tuple | None = None) -> Node:
    return Node(Op.CONST, (), Constant(t, pattern=pattern), fresh_indices(t.shape, tag))


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
    if x.ndim == d + 1:
        raise UnsupportedOpError("convolution of an unbatched input (hogc needs the sample axis first)")
    stride, dilation = _tuple(stride, d), _tuple(dilation, d)
    output_padding = _tuple(output_padding, d)
    N, C, S = x.shape[0], x.shape[1], x.shape[2:]
    K = w.shape[2:]
    if transposed and isinstance(padding, str):
        raise UnsupportedOpError(f"transposed convolution with padding '{padding}'")
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise UnsupportedOpError("padding='same' with a stride")
            tot = [dl * (k - 1) for dl, k in zip(dilation, K)]
            for ax, t in enumerate(tot):  # an odd total: torch puts the extra zero on the right
                if t % 2:
                    dim = 2 + ax
                    size = x.shape[dim] + 1
                    x = B.pad(x, dim, 0, 1, size, fresh_indices((size,), "same")[0])
            S = x.shape[2:]
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
    outl, pats, outs = [n, g, co], [], []
    if G == 1:  # no group axis: the parameter itself is the operand (per-sample gradients stay einsums)
        xs, ws = x, w
        xl, wl, outl = [n, ci], ([co, ci] if not transposed else [ci, co]), [n, co]
    for ax in range(d):
        h, t, o = next(L), next(L), next(L)
        s, k, st, p, dl = S[ax], K[ax], stride[ax], padding[ax], dilation[ax]
        if not transposed:
            out = (s + 2 * p - dl * (k - 1) - 1) // st + 1
            if k == 1 and st == 1 and p == 0:  # dense: the identity
                xl.append(h), wl.append(t), outl.append(h)  # the weight's 1-tap letter is summed alone
                outs.append(s)
                continue
            P = _pattern(s, k, out, st, p, dl, dtype)
            xl.append(h), wl.append(t), outl.append(o)
            pats.append((_const(P, "conv", (st, p, dl)), h + t + o))
        else:
            out = (s - 1) * st - 2 * p + dl * (k - 1) + output_padding[ax] + 1
            P = _pattern(out, k, s, st, p, dl, dtype)  # output position h, tap t, input position o
            xl.append(o), wl.append(t), outl.append(h)
            pats.append((_const(P, "conv", (st, p, dl)), h + t + o))
        outs.append(out)
    operands = [xs, ws] + [c for c, _ in pats]
    terms = ["".join(xl), "".join(wl)] + [sub for _, sub in pats]
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


def _pool_with(x: Node, mats: list[torch.Tensor]) -> Node:
    """Contract each trailing spatial axis of x with its matrix A[h, o]."""
    d = len(mats)
    L = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    lead = "".join(next(L) for _ in range(x.ndim - d))
    xs, outs, terms, ops = lead, lead, [], []
    for A in mats:
        h, o = next(L), next(L)
        xs += h
        outs += o
        terms.append(h + o)
        ops.append(_const(A, "pool"))
    return B.einsum([xs] + terms, outs, [x] + ops)


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
    idx = B.nondiff("pool_argmax", params, x)  # (..., *out): the flat input position of each window's max
    lead, outs = x.shape[:-d], idx.shape[-d:]
    flat = B.gather(B.reshape(x, lead + (math.prod(S),)), B.reshape(idx, lead + (math.prod(outs),)), -1)
    return B.reshape(flat, lead + outs)


def _per_dim(fn, d: int):
    def rule(*a, out_dtype, **k):
        return fn(*a, out_dtype=out_dtype, d=d, **k)
    return rule


for _d in (1, 2, 3):
    lowering(f"avg_pool{_d}d")(_per_dim(_avg_pool, _d))
    lowering(f"adaptive_avg_pool{_d}d")(_per_dim(_adaptive_avg, _d))
    lowering(f"max_pool{_d}d")(_per_dim(_max_pool, _d))


# --- normalization ------------------------------------------------------------------------------

def _normalize(x: Node, dims: list[int], eps: float) -> Node:
    """(x - mean) / sqrt(var + eps) over ``dims`` (biased variance, as the norm layers use)."""
    xc = _sub(x, _mean(x, dims, True))
    var = _mean(_mul(xc, xc), dims, True)
    return _mul(xc, _rsqrt(_add(var, float(eps))))


def _affine(y: Node, weight, bias, shape) -> Node:
    if weight is not None:
        y = _mul(y, B.reshape(weight, shape))
    if bias is not None:
        y = _add(y, B.reshape(bias, shape))
    return y


@lowering("layer_norm")
def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    d = len(normalized_shape)
    return _affine(_normalize(x, list(range(x.ndim - d, x.ndim)), eps), weight, bias, tuple(normalized_shape))


@lowering("group_norm")
def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    N, C, S = x.shape[0], x.shape[1], x.shape[2:]
    g = B.reshape(x, (N, num_groups, C // num_groups) + S)
    y = B.reshape(_normalize(g, list(range(2, g.ndim)), eps), x.shape)
    return _affine(y, weight, bias, (C,) + (1,) * len(S))


@lowering("rms_norm")
def _rms_norm(x, normalized_shape, weight=None, eps=None, *, out_dtype):
    eps = torch.finfo(out_dtype).eps if eps is None else eps
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    y = _mul(x, _rsqrt(_add(_mean(_mul(x, x), dims, True), float(eps))))
    return _affine(y, weight, None, tuple(normalized_shape))


@lowering("batch_norm")
def _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    shape = (x.shape[1],) + (1,) * (x.ndim - 2)
    if training or running_mean is None:  # batch statistics: a mean over the samples (couples them)
        y = _normalize(x, [0] + list(range(2, x.ndim)), eps)
    else:
        y = _mul(_sub(x, B.reshape(running_mean, shape)), B.reshape(_rsqrt(_add(running_var, float(eps))), shape))
    return _affine(y, weight, bias, shape)


@lowering("var", "std")
def _var(x, dim=None, unbiased=True, keepdim=False, *, correction=None, op_name):
    dims = list(range(x.ndim)) if dim is None or dim == [] else [d % x.ndim for d in
                                                                  (dim if isinstance(dim, (list, tuple)) else [dim])]
    if isinstance(unbiased, bool):
        corr = (1 if unbiased else 0) if correction is None else correction
    else:  # var.correction passes the correction positionally-free; 'unbiased' may hold keepdim
        corr = 1 if correction is None else correction
    count = math.prod(x.shape[d] for d in dims)
    if count - corr <= 0:
        raise UnsupportedOpError(f"{op_name} over {count} element(s) with correction {corr}: torch gives inf or "
                                 f"nan there, which has no derivative")
    xc = _sub(x, _mean(x, dims, True))
    v = B.scale(_sum(_mul(xc, xc), dims, keepdim), 1.0 / (count - corr))
    return _unary("sqrt")(v) if op_name == "std" else v


# --- softmax and attention ----------------------------------------------------------------------

def _shifted(x: Node, dim: int) -> Node:
    """x - max(x) along dim, the max held constant (softmax is invariant to the shift)."""
    return _sub(x, B.nondiff("amax", ((dim % x.ndim,),), x))


@lowering("softmax", "_softmax")
def _softmax(x, dim, dtype=None):
    e = _exp(_shifted(x, dim))
    return B.div(e, _sum(e, [dim], True))


@lowering("log_softmax", "_log_softmax")
def _log_softmax(x, dim, dtype=None):
    z = _shifted(x, dim)
    return _sub(z, _log(_sum(_exp(z), [dim], True)))


@lowering("scaled_dot_product_attention")
def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False, out_dtype):
    if dropout_p:
        raise UnsupportedOpError("attention dropout (dropout_p > 0): call model.eval() or set dropout_p=0")
    if enable_gqa:
        raise UnsupportedOpError("scaled_dot_product_attention with enable_gqa=True")
    E, Lq, S = q.shape[-1], q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    lead = "abcdefgh"[:q.ndim - 2]
    s = B.scale(B.einsum([lead + "ie", lead + "je"], lead + "ij", [q, k]), scale)
    if is_causal:
        mask = torch.zeros(Lq, S, dtype=out_dtype).masked_fill(~torch.ones(Lq, S, dtype=torch.bool).tril(), -math.inf)
        s = _add(s, _const(mask, "causal"))
    if attn_mask is not None:
        if attn_mask.op is Op.CONST and isinstance(attn_mask.arg, Constant):
            m = attn_mask.arg.tensor
            additive = torch.zeros(m.shape, dtype=out_dtype).masked_fill(~m, -math.inf) if m.dtype == torch.bool \
                else m.to(out_dtype)
            s = _add(s, _const(additive, "mask"))
        elif attn_mask.op is Op.INPUT and attn_mask.arg[0] == "buffer":  # a registered mask: read at each call
            s = _add(s, B.nondiff("additive_mask", (str(out_dtype).split(".")[-1],), attn_mask))
        else:
            raise UnsupportedOpError("scaled_dot_product_attention with an attn_mask computed inside the model "
                                     "(pass a constant or a registered buffer, or is_causal=True)")
    p = _softmax(s, -1)
    return B.einsum([lead + "ij", lead + "jf"], lead + "if", [p, v])


# --- embedding and padding ----------------------------------------------------------------------

@lowering("embedding")
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False, *, out_dtype):
    if padding_idx is not None and padding_idx >= 0:
        raise UnsupportedOpError("embedding with padding_idx (its row gets no gradient, which hogc's exact "
                                 "derivatives do not model yet); use padding_idx=None")
    if scale_grad_by_freq:
        raise UnsupportedOpError("embedding with scale_grad_by_freq=True")
    hot = B.nondiff("one_hot", (weight.shape[0], str(out_dtype).split(".")[-1]), indices)
    L = "abcdefgh"[:indices.ndim]
    return B.einsum([L + "v", "vd"], L + "d", [hot, weight])


@lowering("pad", "constant_pad_nd")
def _pad(x, pad, mode="constant", value=None, *, out_dtype):
    if mode != "constant":
        raise UnsupportedOpError(f"padding mode '{mode}' (only 'constant' is supported)")
    y = x
    for k in range(len(pad) // 2):
        dim = x.ndim - 1 - k
        left, right = pad[2 * k], pad[2 * k + 1]
        n = y.shape[dim]
        if left < 0 or right < 0:
            y = B.slice_(y, dim, max(-left, 0), n - max(-right, 0))
            left, right, n = max(left, 0), max(right, 0), y.shape[dim]
        if left or right:
            y = B.pad(y, dim, left, 1, n + left + right, fresh_indices((n + left + right,), "pad")[0])
    if value:
        ones = torch.ones(x.shape, dtype=out_dtype)
        filled = torch.nn.functional.pad(ones, list(pad), value=0.0)
        y = _add(y, _const((1 - filled) * value, "pad"))
    return y
