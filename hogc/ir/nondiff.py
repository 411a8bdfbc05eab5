"""Piecewise-constant functions of a value: computed at run time, derivative zero to every order.

``NONDIFF`` nodes carry what a model computes from its values only to *select* (the argmax of a
max-pooling window), to *encode* (the one-hot of token ids) or to *shift* where the result is
invariant to the shift (softmax's ``x - max x``: ``softmax(x - c) = softmax(x)`` for every c, so
holding c constant changes no derivative of any order). Each function says its result's shape
and which result axes are input axes (so index inference keeps the sample axis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["NONDIFF_FUNCTIONS", "NondiffFunction", "pool_output_size"]


@dataclass(frozen=True)
class NondiffFunction:
    shape: Callable[[tuple, tuple[int, ...]], tuple[int, ...]]  # (params, input shape) -> result shape
    kept: Callable[[tuple, int], list[tuple[int, int]]]  # (params, input ndim) -> (result axis, input axis)
    run: Callable  # (x, *params) -> tensor


def pool_output_size(size: int, k: int, stride: int, pad: int, dil: int, ceil: bool) -> int:
    """torch's pooling output size along one axis."""
    span = size + 2 * pad - dil * (k - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _amax_shape(params, shape):
    dims, = params
    return tuple(1 if k in dims else d for k, d in enumerate(shape))


def _argmax_shape(params, shape):
    kernel, stride, pad, dil, ceil = params
    d = len(kernel)
    return tuple(shape[:-d]) + tuple(pool_output_size(s, k, st, p, dl, ceil)
                                     for s, k, st, p, dl in zip(shape[-d:], kernel, stride, pad, dil))


def pool_argmax(x: torch.Tensor, kernel, stride, pad, dil, ceil) -> torch.Tensor:
    """The flat input position (into the trailing len(kernel) axes) each pooling window takes its
    maximum from, (…, *out), int64: torch's own max pooling picks it, so ties break as torch's do."""
    d = len(kernel)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
    lead = x.shape[:x.ndim - d]
    flat = x.reshape((-1, lead[-1] if lead else 1) + tuple(x.shape[x.ndim - d:]))  # (B, C, *S)
    if x.device.type == "cpu" and d > 1:  # torch's channels-last CPU kernel: 5-16x faster, same ties
        flat = flat.contiguous(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)
    _, idx = pool(flat, kernel, stride, pad, dil, ceil, return_indices=True)
    return idx.reshape(tuple(lead) + tuple(idx.shape[2:]))


def wrap_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """A runtime index as gather takes it: negatives count from the end, as in torch indexing;
    a boolean mask (a data-dependent result shape) is refused."""
    if idx.dtype == torch.bool:
        from ..errors import UnsupportedOpError
        raise UnsupportedOpError("a boolean mask as a runtime index (its result's shape depends on the data) is not "
                                 "supported; index with integer positions")
    return torch.remainder(idx, size)


def amax(x: torch.Tensor, dims) -> torch.Tensor:
    return torch.amax(x, dims, keepdim=True)


def one_hot(x: torch.Tensor, num_classes: int, dtype: str) -> torch.Tensor:
    return torch.nn.functional.one_hot(x.long(), num_classes).to(getattr(torch, dtype))


def dropout_mask(x: torch.Tensor, seed: torch.Tensor, p: float, stream: int) -> torch.Tensor:
    """Inverted dropout's scaled mask for this call: Bernoulli(1 - p) / (1 - p), from the call's
    seed (drawn from its generator: ``seed=`` / ``generator=`` of hogc.compile make it reproducible)
    and the dropout site's stream (``hogc.emit.random``: traceable, no torch.Generator inside)."""
    from ..emit.random import dropout_mask as draw
    return draw(x, seed, p, stream)


def additive_mask(m: torch.Tensor, dtype: str) -> torch.Tensor:
    """An attention mask as scores to add: a boolean one is 0 where allowed, -inf elsewhere."""
    dt = getattr(torch, dtype)
    return torch.zeros(m.shape, dtype=dt, device=m.device).masked_fill(~m, -math.inf) if m.dtype == torch.bool \
        else m.to(dt)


NONDIFF_FUNCTIONS: dict[str, NondiffFunction] = {
    # params (dims,): the maximum over dims, kept as size-1 axes
    "amax": NondiffFunction(_amax_shape, lambda p, n: [(k, k) for k in range(n) if k not in p[0]],
                            amax),
    # params (kernel, stride, padding, dilation, ceil_mode) over the trailing len(kernel) axes: the
    # flat input position of each window's maximum, (..., *out), int64
    "pool_argmax": NondiffFunction(_argmax_shape, lambda p, n: [(k, k) for k in range(n - len(p[0]))],
                                   pool_argmax),
    # params (size,): integer indices into an axis of that size, negatives wrapped
    "wrap_index": NondiffFunction(lambda p, shape: tuple(shape), lambda p, n: [(k, k) for k in range(n)],
                                  wrap_index),
    # params (p, stream), sources (x, seed): the scaled dropout mask of this call, shaped like x
    "dropout_mask": NondiffFunction(lambda p, shape: tuple(shape), lambda p, n: [(k, k) for k in range(n)],
                                    dropout_mask),
    # params (dtype name,): a boolean or additive attention mask -> additive scores
    "additive_mask": NondiffFunction(lambda p, shape: tuple(shape), lambda p, n: [(k, k) for k in range(n)],
                                     additive_mask),
    # params (num_classes, dtype name): integer ids -> one-hot rows
    "one_hot": NondiffFunction(lambda p, shape: tuple(shape) + (p[0],), lambda p, n: [(k, k) for k in range(n)],
                               one_hot),
}
