"""Batched pairwise products that keep their operands in place.

``torch.einsum`` lowers ``out[b, i, j] = sum_k a[b, i, k] c[b, k, j]`` to one ``bmm`` after
permuting each operand to (batch, free, contracted) and flattening the groups. When a group is
not contiguous in memory, the flattening copies the whole operand. In derivative programs the
usual offender is the square-root columns' letter: a cotangent laid out (c, n, o, h, w) is batched
over the samples n, so its free letters (c, o) straddle the batch letter and einsum copies all
of it (64 MiB on 3c3d's first convolution), every call.

``batched_product`` looks at the operands' strides at run time. The free letters of the larger
operand that sit outside its batch letters become a loop: each step is a ``bmm`` over views,
written in place into one output buffer laid out (loop, batch, free of a, free of b). Only the
other operand may be copied, once, where its letters cannot be flattened (a convolution's windows).
The result is that buffer, permuted (a view) to the equation's output order.
"""
from __future__ import annotations

import math

import torch

__all__ = ["batched_product", "in_place_plan", "larger", "MAX_STEPS", "MIN_ELEMENTS"]

#: at most this many ``bmm`` calls in the loop; more falls back to torch.einsum
MAX_STEPS = 64
#: operands smaller than this (elements) are left to torch.einsum: their copy is cheap, and one
#: large GEMM beats several small ones
MIN_ELEMENTS = 1 << 18


def _flattens(x: torch.Tensor, dims: list[int]) -> bool:
    """Whether ``x``'s ``dims``, in this order, flatten into one axis without a copy."""
    dims = [d for d in dims if x.shape[d] != 1]
    return all(x.stride(d) == x.stride(e) * x.shape[e] for d, e in zip(dims, dims[1:]))


def _by_stride(x: torch.Tensor, s: str, letters) -> list[str]:
    return sorted(letters, key=lambda c: -x.stride(s.index(c)))


def _plan(a: torch.Tensor, sa: str, b: torch.Tensor, sb: str, out: str):
    """(loop letters, batch, free of a, contracted, free of b) orders, or None where einsum is as good."""
    batch = [c for c in sa if c in sb and c in out]
    con = [c for c in sa if c in sb and c not in out]
    fa, fb = [c for c in sa if c not in sb], [c for c in sb if c not in sa]
    if not batch or not con or not fa or any(c not in out for c in fa + fb):
        return None
    batch, con, fa = _by_stride(a, sa, batch), _by_stride(a, sa, con), _by_stride(a, sa, fa)
    dims = lambda letters: [sa.index(c) for c in letters]  # noqa: E731
    if all(_flattens(a, dims(g)) for g in (batch, fa, con)):
        return None  # einsum copies nothing of a
    inner = min(a.stride(sa.index(c)) for c in batch)
    loop = [c for c in fa if a.stride(sa.index(c)) > inner]
    rest = [c for c in fa if c not in loop]
    steps = math.prod(a.shape[sa.index(c)] for c in loop)
    if not loop or not rest or steps > MAX_STEPS or \
            not all(_flattens(a, dims(g)) for g in (loop, batch, rest, con)):
        return None
    return loop, batch, rest, con, fb


def _split(eq: str) -> tuple[str, str, str]:
    ins, out = eq.split("->")
    sa, sb = ins.split(",")
    return sa, sb, out


def larger(a: torch.Tensor, b: torch.Tensor) -> int:
    """Which operand the loop runs over (0: ``a``, 1: ``b``): the larger one, ``a`` on a tie."""
    return int(b.numel() > a.numel())


def in_place_plan(eq: str, a: torch.Tensor, b: torch.Tensor):
    """(swap, plan) when ``batched_product`` loops over views of the larger operand (``swap``: that is
    ``b``), None when it hands the product to torch.einsum. Reads shapes and strides only, so the
    memory model asks it with meta tensors."""
    if max(a.numel(), b.numel()) < MIN_ELEMENTS:
        return None
    sa, sb, out = _split(eq)
    swap = bool(larger(a, b))
    plan = _plan(b, sb, a, sa, out) if swap else _plan(a, sa, b, sb, out)
    return None if plan is None else (swap, plan)


def batched_product(eq: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(eq, a, b)`` for a batched pairwise product, without copying the larger
    operand when its free letters straddle its batch letters (see the module)."""
    found = None
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        found = in_place_plan(eq, a, b)  # Inductor plans its own layouts; out= records no grads
    if found is None:
        return torch.einsum(eq, a, b)
    sa, sb, out = _split(eq)
    swap, (loop, batch, fa, con, fb) = found
    if swap:
        a, b, sa, sb = b, a, sb, sa
    size = {c: n for s, x in ((sa, a), (sb, b)) for c, n in zip(s, x.shape)}
    n = lambda letters: math.prod(size[c] for c in letters)  # noqa: E731
    # b as (batch, free, contracted) with its contracted letters in a's order: copied at most once
    bm = b.permute([sb.index(c) for c in batch + fb + con]).reshape(n(batch), n(fb), n(con))
    order = loop + batch + fa + fb
    buf = torch.empty([size[c] for c in order], dtype=torch.result_type(a, b), device=a.device)
    flat = buf.view(n(loop), n(batch), n(fa), n(fb))
    # a view: _plan checked that each group flattens
    am = a.permute([sa.index(c) for c in loop + batch + fa + con]).reshape(n(loop), n(batch), n(fa), n(con))
    for i in range(n(loop)):
        torch.bmm(am[i], bm.transpose(1, 2), out=flat[i])
    return buf.permute([order.index(c) for c in out])
