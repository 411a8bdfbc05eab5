"""Random draws as plain tensor arithmetic: a counter-based generator that torch.compile traces.

A program that draws (Monte-Carlo GGN columns, dropout masks) takes one int64 seed per call,
drawn from the call's ``torch.Generator`` before the program runs. Every draw inside is a hash of
(seed, stream, element position): integer multiplies, shifts and xors, which Dynamo captures in
the same graph as the rest of the program (a ``torch.Generator`` argument would break it) and
Inductor fuses. The same seed gives the same numbers eagerly and compiled, on the CPU and on CUDA.

The hash is ``lowbias32`` (C. Wellons' integer hash prospector: 0x7feb352d, 0x846ca68b), kept
in int64 lanes so every product stays below 2**63: 32-bit words multiply by 16-bit halves of
the constants. Each stream (a draw site) has its own salt; a float64 uniform takes 53 bits
from two hashes, a float32 one 24.
"""
from __future__ import annotations

import math
import zlib

import torch

__all__ = ["draw_seed", "stream_of", "uniform", "normal", "categorical", "dropout_mask"]

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 32-bit words x, without an int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_of(name: str) -> int:
    """A draw site's stream number from its name (stable across runs and processes)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def draw_seed(generator: torch.Generator, device) -> torch.Tensor:
    """The one seed a call's program draws from (an int64 scalar tensor on ``device``)."""
    return torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device).to(device)


def _words(seed: torch.Tensor, stream: int, shape, device) -> torch.Tensor:
    n = math.prod(shape)
    key = _hash32((seed.to(torch.int64) & _MASK32) ^ _hash32(torch.tensor(stream & _MASK32, device=device)))
    pos = torch.arange(n, dtype=torch.int64, device=device) & _MASK32
    return _hash32(_hash32(pos) ^ key).reshape(shape)


def uniform(seed: torch.Tensor, stream: int, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uniform draws, one per element of ``shape``: in (0, 1) in float64, in [0, 1) on the float32
    grid of 2**-24 otherwise."""
    shape = tuple(shape)
    h = _words(seed, stream, shape, device)
    if dtype == torch.float64:
        h2 = _hash32(h ^ 0x5BD1E995)
        bits = (h >> 11) * 2**32 + h2  # 53 bits: 21 from h, 32 from h2
        return (bits.to(torch.float64) + 0.5) * 2.0**-53
    return (h >> 8).to(dtype) * 2.0**-24


def normal(seed: torch.Tensor, stream: int, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normal draws (Box-Muller on two uniform streams)."""
    u1 = uniform(seed, stream, shape, torch.float64, device)
    u2 = uniform(seed, stream ^ 0x2545F491, shape, torch.float64, device)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


def categorical(p: torch.Tensor, seed: torch.Tensor, stream: int, draws: int) -> torch.Tensor:
    """``draws`` class indices per row of the probabilities ``p`` (R, C), with replacement:
    (draws, R), by inverting each row's cumulative distribution at uniform draws."""
    u = uniform(seed, stream, (draws, p.shape[0]), torch.float64, p.device)
    cdf = torch.cumsum(p.to(torch.float64), dim=1)
    cdf = cdf / cdf[:, -1:]
    below = (cdf.unsqueeze(0) < u.unsqueeze(-1)).sum(-1)  # the first class whose cdf reaches u
    return below.clamp_(max=p.shape[1] - 1)


def dropout_mask(x: torch.Tensor, seed: torch.Tensor, p: float, stream: int) -> torch.Tensor:
    """Inverted dropout's scaled mask for this call: Bernoulli(1 - p) / (1 - p), shaped like x."""
    keep = uniform(seed, stream, x.shape, x.dtype, x.device) >= p
    return keep.to(x.dtype) / (1.0 - p)
