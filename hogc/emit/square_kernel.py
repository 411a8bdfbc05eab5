"""The fused square-then-contract kernel: ``out = sum (A . B)^2`` without writing ``A . B``.

Diagonals of GGN-type matrices and per-sample norms square a pairwise product and sum it:
``ggn_diag`` of a convolution is ``sum_{n,c} (sum_p S[n,c,o,p] X[n,i,p])^2``, ``batch_l2`` is
``sum_{o,i} (sum_p G[n,o,p] X[n,i,p])^2`` per sample. Library calls write the product V first
(a batched GEMM) and read it back to square it; when the contraction is short, V's traffic costs
more than its arithmetic. This kernel computes V one tile at a time in registers (``tl.dot``),
squares it there and accumulates, so V never reaches memory.

Any such product is first arranged as a canonical problem (``SquareProblem``):

- ``A`` viewed as ``[GK, GR, LM, R, K]`` and ``B`` as ``[GK, GR, LN, K, C]``;
- ``GK``: batch letters of V (in both factors) the result keeps: one program column each;
- ``GR``: batch letters summed, ``LM``/``LN``: letters of one factor summed while the result
  keeps others of that factor: loops inside each program;
- ``R``/``C``: the tile rows and columns; a factor whose letters are all summed puts them on
  the tile and sums the squared tile there (``sum_rows``/``sum_cols``).

The kernel writes one partial per tile along summed tile axes; torch adds those few up. It is
registered as the custom op ``hogc::square_product`` so torch.compile keeps it as one opaque
call (no graph break). On CUDA it is a compiled Triton kernel; on the CPU it runs only in
Triton's interpreter (``TRITON_INTERPRET=1``), which is for tests, not speed.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["SquareProblem", "equations", "square_problem", "square_transient", "square_product", "triton_available", "TILE"]

#: (rows, columns, contraction) of one tile; tl.dot needs at least 16 on each side.
TILE = (32, 32, 32)


@dataclass(frozen=True)
class SquareProblem:
    """``V[gk, gr, m, n] = sum_k A[..] B[..]``, summed squares kept on ``gk`` and the kept letters."""

    a_groups: tuple[str, ...]  # A's letters per kernel axis (gk, gr, lm, r, k)
    b_groups: tuple[str, ...]  # B's letters per kernel axis (gk, gr, ln, k, c)
    groups: tuple[int, int, int, int, int, int, int]  # sizes GK, GR, LM, LN, R, C, K
    sum_rows: bool  # the tile rows are summed letters (the result keeps none of A's own letters)
    sum_cols: bool
    kept: str  # the result's letters in the order the kernel leaves them (gk, kept rows, kept cols)
    kept_shape: tuple[int, ...]

    @property
    def partial_shape(self) -> tuple[int, int, int]:
        """The kernel's output: (GK, rows or row tiles, columns or column tiles), one partial sum
        per tile along a summed tile axis."""
        GK, _, _, _, R, C, _ = self.groups
        return (GK, -(-R // TILE[0]) if self.sum_rows else R, -(-C // TILE[1]) if self.sum_cols else C)

    @property
    def product_elements(self) -> int:
        gk, gr, lm, ln, r, c, _ = self.groups
        return gk * gr * lm * ln * r * c


def equations(product, square) -> tuple[str, str]:
    """IR einsums (``product`` of V, ``square`` summing V's square) as the kernel's strings
    ``'ab,cb->ac'`` and ``'ac->c'`` over ASCII letters, the square in V's letters ('' if more
    than 52 letters)."""
    letters = dict.fromkeys("".join(product.inputs) + product.output)
    if len(letters) > 52:
        return "", ""
    m = dict(zip(letters, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    to_v = dict(zip(square.inputs[0], product.output))
    prod = ",".join("".join(m[c] for c in s) for s in product.inputs) + "->" + "".join(m[c] for c in product.output)
    return prod, "".join(m[c] for c in product.output) + "->" + "".join(m[to_v[c]] for c in square.output)


def square_problem(product: str, square: str, sizes: dict[str, int]) -> SquareProblem | None:
    """The canonical problem of ``out = sum (a . b)^2`` for ``product`` ``'sa,sb->v'`` and
    ``square`` ``'v->out'`` (letters of V, the result's a subset), or None when the product has a
    form the kernel does not take (a letter twice in a factor, or summed on one side alone)."""
    ins, v = product.split("->")
    sa, sb = ins.split(",")
    sv, out = square.split("->")
    if sv != v or len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(out)) != len(out):
        return None
    if any(c not in v and c not in sb for c in sa) or any(c not in v and c not in sa for c in sb):
        return None
    if any(c not in v for c in out):
        return None
    g = [c for c in v if c in sa and c in sb]
    m = [c for c in v if c in sa and c not in sb]
    n = [c for c in v if c in sb and c not in sa]
    k = [c for c in sa if c in sb and c not in v]
    gk, gr = [c for c in g if c in out], [c for c in g if c not in out]
    mk, mr = [c for c in m if c in out], [c for c in m if c not in out]
    nk, nr = [c for c in n if c in out], [c for c in n if c not in out]
    rows, lm = (mk, mr) if mk else (mr, [])
    cols, ln = (nk, nr) if nk else (nr, [])

    def size(letters):
        return math.prod(sizes[c] for c in letters)

    kept = gk + mk + nk
    return SquareProblem(tuple("".join(x) for x in (gk, gr, lm, rows, k)), tuple("".join(x) for x in (gk, gr, ln, k, cols)),
                         (size(gk), size(gr), size(lm), size(ln), size(rows), size(cols), size(k)),
                         not mk, not nk, "".join(kept), tuple(sizes[c] for c in kept))


def triton_available(device_type: str) -> bool:
    """Whether the Triton kernel can run on ``device_type``: compiled on CUDA, interpreted on the
    CPU when ``TRITON_INTERPRET=1`` (read when the kernel is first built)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _kernel():
    """Build the Triton kernel on first use (triton reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def square_product_kernel(A, B, O, GR, LM, LN, R, C, K,
                              a_gk, a_gr, a_lm, a_r, a_k, b_gk, b_gr, b_ln, b_k, b_c, o_gk, o_r, o_c,
                              SUM_R: tl.constexpr, SUM_C: tl.constexpr, ACC: tl.constexpr,
                              PRECISION: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
        gk = tl.program_id(0)
        pr = tl.program_id(1)
        pc = tl.program_id(2)
        rows = pr * BR + tl.arange(0, BR)
        cols = pc * BC + tl.arange(0, BC)
        ks = tl.arange(0, BK)
        acc = tl.zeros((BR, BC), dtype=ACC)
        for t in range(GR * LM * LN):
            gr = t // (LM * LN)
            lm = (t // LN) % LM
            ln = t % LN
            pa = A + gk * a_gk + gr * a_gr + lm * a_lm
            pb = B + gk * b_gk + gr * b_gr + ln * b_ln
            v = tl.zeros((BR, BC), dtype=ACC)
            for k0 in range(0, K, BK):
                kk = k0 + ks
                a = tl.load(pa + rows[:, None] * a_r + kk[None, :] * a_k,
                            mask=(rows[:, None] < R) & (kk[None, :] < K), other=0.0)
                b = tl.load(pb + kk[:, None] * b_k + cols[None, :] * b_c,
                            mask=(kk[:, None] < K) & (cols[None, :] < C), other=0.0)
                v += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
            acc += v * v
        base = O + gk * o_gk
        if SUM_R and SUM_C:
            tl.store(base + pr * o_r + pc * o_c, tl.sum(tl.sum(acc, axis=1), axis=0))
        elif SUM_R:
            tl.store(base + pr * o_r + cols * o_c, tl.sum(acc, axis=0), mask=cols < C)
        elif SUM_C:
            tl.store(base + rows * o_r + pc * o_c, tl.sum(acc, axis=1), mask=rows < R)
        else:
            tl.store(base + rows[:, None] * o_r + cols[None, :] * o_c, acc,
                     mask=(rows[:, None] < R) & (cols[None, :] < C))

    return square_product_kernel, tl


def square_transient(node) -> int:
    """Elements a SQUARE_PRODUCT node allocates besides its result while it runs: the operands
    arranged in the kernel's order (when that is not their own) and the per-tile partial sums."""
    prod, sq = equations(*node.arg[:2])
    sa, sb = prod.split("->")[0].split(",")
    sizes = _sizes(*(x.shape for x in node.src), prod)
    p = square_problem(prod, sq, sizes)
    parts = math.prod(p.partial_shape)
    copies = sum(math.prod(x.shape) for s, groups, x in ((sa, p.a_groups, node.src[0]), (sb, p.b_groups, node.src[1]))
                 if not _views(s, groups, sizes, x))
    return parts + copies


def _views(have: str, groups: tuple[str, ...], sizes: dict[str, int], x) -> bool:
    """Whether arranging an operand into the kernel's 5 axes is a view: each group's letters (not
    of size 1) lie adjacent and in order in a contiguous operand (views of views copy)."""
    from hogc.ir import Op
    if x.op in (Op.PERMUTE, Op.EXPAND, Op.WINDOWS):
        return False
    order = [c for c in have if sizes[c] > 1]
    for group in groups:
        pos = [order.index(c) for c in group if sizes[c] > 1]
        if pos != list(range(pos[0], pos[0] + len(pos))) if pos else False:
            return False
    return True


def _sizes(a_shape, b_shape, product: str) -> dict[str, int]:
    sa, sb = product.split("->")[0].split(",")
    return {**dict(zip(sa, a_shape)), **dict(zip(sb, b_shape))}


def _arranged(x: torch.Tensor, have: str, want: str, shape: tuple[int, ...]) -> torch.Tensor:
    perm = [have.index(c) for c in want]
    return x.permute(perm).reshape(shape)


def _launch(a: torch.Tensor, b: torch.Tensor, product: str, square: str) -> torch.Tensor:
    sizes = _sizes(a.shape, b.shape, product)
    p = square_problem(product, square, sizes)
    if p is None:
        raise ValueError(f"square_product: '{product}' squared as '{square}' is not a product the kernel takes")
    if not triton_available(a.device.type):
        raise RuntimeError(f"square_product needs Triton on {a.device.type}: a CUDA device, or TRITON_INTERPRET=1 "
                           f"set before the kernel's first use on the CPU")
    kernel, tl = _kernel()
    sa, sb = product.split("->")[0].split(",")
    GK, GR, LM, LN, R, C, K = p.groups
    A = _arranged(a, sa, "".join(p.a_groups), (GK, GR, LM, R, K))
    Bm = _arranged(b, sb, "".join(p.b_groups), (GK, GR, LN, K, C))
    BR, BC, BK = TILE
    tiles_r, tiles_c = -(-R // BR), -(-C // BC)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    O = torch.empty(p.partial_shape, dtype=acc, device=a.device)
    tf32 = a.dtype == torch.float32 and a.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    kernel[(GK, tiles_r, tiles_c)](
        A, Bm, O, GR, LM, LN, R, C, K, *A.stride()[:2], A.stride(2), A.stride(3), A.stride(4),
        *Bm.stride()[:2], Bm.stride(2), Bm.stride(3), Bm.stride(4), *O.stride(),
        SUM_R=p.sum_rows, SUM_C=p.sum_cols, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        PRECISION="tf32" if tf32 else "ieee", BR=BR, BC=BC, BK=BK)
    dims = [d for d, s in ((1, p.sum_rows), (2, p.sum_cols)) if s]
    res = (O.sum(dims) if dims else O).to(a.dtype).reshape(p.kept_shape)
    out = square.split("->")[1]
    return res.permute([p.kept.index(c) for c in out])


def _result_shape(a: torch.Tensor, b: torch.Tensor, product: str, square: str) -> list[int]:
    sizes = _sizes(a.shape, b.shape, product)
    return [sizes[c] for c in square.split("->")[1]]


@torch.library.custom_op("hogc::square_product", mutates_args=())
def square_product(a: torch.Tensor, b: torch.Tensor, product: str, square: str) -> torch.Tensor:
    """``einsum(square, einsum(product, a, b) ** 2)`` in one Triton kernel that never writes the
    product (see the module docstring)."""
    return _launch(a, b, product, square).contiguous()


@square_product.register_fake
def _(a, b, product, square):
    return a.new_empty(_result_shape(a, b, product, square))
