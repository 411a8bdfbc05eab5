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


def _window_shape(params, shape):
    kernel, stride, pad, dil, ceil = params
    d = len(kernel)
    outs = tuple(pool_output_size(s, k, st, p, dl, ceil)
                 for s, k, st, p, dl in zip(shape[-d:], kernel, stride, pad, dil))
    return tuple(shape[:-d]) + outs + tuple(kernel)


def _window_argmax(x: torch.Tensor, kernel, stride, pad, dil, ceil) -> torch.Tensor:
    """One-hot (…, *out, *kernel) of each pooling window's first maximum (padding is -inf)."""
    d = len(kernel)
    outs = _window_shape((kernel, stride, pad, dil, ceil), tuple(x.shape))[x.ndim - d:x.ndim]
    widths = []
    for k in range(d):  # pad right far enough for ceil-mode windows
        need = (outs[k] - 1) * stride[k] + dil[k] * (kernel[k] - 1) + 1
        widths.append((pad[k], max(0, need - x.shape[x.ndim - d + k] - pad[k])))
    flat = [w for pair in reversed(widths) for w in pair]
    xp = torch.nn.functional.pad(x, flat, value=-math.inf)
    for k in range(d):
        ax = x.ndim - d + k
        xp = xp.unfold(ax, dil[k] * (kernel[k] - 1) + 1, stride[k])[..., ::dil[k]].narrow(ax, 0, outs[k])
    win = xp.reshape(*xp.shape[:x.ndim], math.prod(kernel))
    hot = torch.nn.functional.one_hot(win.argmax(-1), math.prod(kernel)).to(x.dtype)
    return hot.reshape(*xp.shape[:x.ndim], *kernel)


def amax(x: torch.Tensor, dims) -> torch.Tensor:
    return torch.amax(x, dims, keepdim=True)


def one_hot(x: torch.Tensor, num_classes: int, dtype: str) -> torch.Tensor:
    return torch.nn.functional.one_hot(x.long(), num_classes).to(getattr(torch, dtype))


def window_argmax(x: torch.Tensor, kernel, stride, pad, dil, ceil) -> torch.Tensor:
    return _window_argmax(x, kernel, stride, pad, dil, ceil)


NONDIFF_FUNCTIONS: dict[str, NondiffFunction] = {
    # params (dims,): the maximum over dims, kept as size-1 axes
    "amax": NondiffFunction(_amax_shape, lambda p, n: [(k, k) for k in range(n) if k not in p[0]],
                            amax),
    # params (kernel, stride, padding, dilation, ceil_mode) over the trailing len(kernel) axes
    "window_argmax": NondiffFunction(_window_shape, lambda p, n: [(k, k) for k in range(n - len(p[0]))],
                                     window_argmax),
    # params (num_classes, dtype name): integer ids -> one-hot rows
    "one_hot": NondiffFunction(lambda p, shape: tuple(shape) + (p[0],), lambda p, n: [(k, k) for k in range(n)],
                               one_hot),
}
