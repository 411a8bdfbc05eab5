"""Kronecker factors of the GGN blocks of linear maps: KFLR (exact), KFAC (Monte-Carlo) and
KFRA (batch-averaged recursion)."""
from __future__ import annotations

import math

from hogc.passes import elementwise as E

from ..capture.losses import num_columns
from ..errors import UnsupportedOpError
from ..ir import COLUMN, Index, Node, Op, Variance, build as B, dual
from .builder import DerivativeBuilder
from .registry import register_quantity


def _kronecker(b: DerivativeBuilder, mc: bool) -> dict[str, Node]:
    """Per parameter of a linear map, the factors (B, A) with B (x) A approximating its GGN block:
    B = sum_{c,n} g_cn g_cn^T from the square-root backward pass (output side, lower-lower) and
    A = mean_n x_n x_n^T (input side, upper-upper); a bias gets (B,). Keys ``"<name>/<k>"``."""
    sites = b.linear_maps
    convs = b.conv_maps
    if not sites and not convs:
        raise UnsupportedOpError("no parameter is used exactly once as the weight of a linear map on a 2-d "
                                 "input (F.linear(x, W, b) or x @ W.T + b), so there are no Kronecker factors to "
                                 "compute (weights shared over positions or layers arrive with the sequence work)")
    cots = b.column_cotangents(mc, {f"z{k}": z for k, (_, z, _) in (sites | convs).items()})
    out = {}
    for name, (kind, y, unfold) in convs.items():
        # BackPACK's convention for convolutions (KFC with the bias's output factor):
        # B = sum_{c,n} (sum_t g_t)(sum_t g_t)^T over positions t, A = sum_{n,t} u_t u_t^T / N
        g = cots[f"z{name}"]  # (c, n, C_out, *positions)
        npos = g.ndim - 3
        L = B.letters(g.ndim + 1 + npos)
        s, o2, t2 = L[:g.ndim], L[g.ndim], L[g.ndim + 1:]
        # summing positions is basis-dependent (a contraction with ones): metric letters
        out[f"{name}/0"] = B.einsum([s, s[:2] + o2 + t2], s[2] + o2, [g, g], metric=s[3:] + t2,
                                    out_indices=(g.indices[2], g.indices[2]))
        if kind == "conv_weight":  # unfold: (n, C_in, *taps, *positions)
            d = (unfold.ndim - 2) // 2
            n_in = math.prod(unfold.shape[1:2 + d])
            M = B.letters(unfold.ndim + 1 + d)
            u1, fresh = M[:unfold.ndim], M[unfold.ndim:]
            u2 = u1[0] + fresh + u1[2 + d:]  # the same sample and positions, other (channel, taps)
            A = B.einsum([u1, u2], u1[1:2 + d] + fresh, [unfold, unfold], metric=u1[2 + d:])
            out[f"{name}/1"] = B.reshape(B.scale(A, 1.0 / b.N), (n_in, n_in))
    for name, (kind, z, x) in sites.items():
        g = cots[f"z{name}"]
        o = g.indices[2]
        out[f"{name}/0"] = B.einsum(["cno", "cnp"], "op", [g, g], out_indices=(o, o))
        if kind == "weight":
            i = x.indices[1]
            a = B.einsum(["ni", "nj"], "ij", [x, x], out_indices=(i, i))
            out[f"{name}/1"] = B.scale(a, 1.0 / b.N)
    return out


@register_quantity("kflr", per_sample=True)
def _kflr(b):
    """Kronecker factors from the exact loss-Hessian square root (KFLR): (B, A) for weights of
    linear maps and convolutions (BackPACK's convention for these), (B,) for their biases; GGN
    block ~ B (x) A. Other parameters are left out."""
    return _kronecker(b, mc=False)


@register_quantity("kfac", per_sample=True)
def _kfac(b):
    """Kronecker factors from the Monte-Carlo square root (KFAC, ``mc_samples`` columns, seeded like
    ggn_diag_mc); same layout as kflr."""
    return _kronecker(b, mc=True)


def _kfra_output_factors(b: DerivativeBuilder) -> dict[int, Node]:
    """KFRA's batch-averaged recursion from the output down a chain of linear maps and elementwise
    activations: M at the output is sum_n (loss Hessian)_n; a linear map gives W^T M W; an
    elementwise activation gives M * mean_n sigma'_n sigma'_n^T. Returns M by linear-map output uid."""
    sites = {z.uid: (kind, z) for kind, z, _ in b.linear_maps.values() if kind == "weight"}
    c = Index("c", num_columns(b.spec, b.output.shape), COLUMN, Variance.BATCH)
    seed = Node(Op.LOSS_SQRT_HESSIAN, (b.output, b.target), b.spec, (c,) + dual(b.output.indices))
    if b.output.ndim != 2:
        raise UnsupportedOpError("kfra needs a model output of shape (N, C)")
    M = B.einsum(["cno", "cnp"], "op", [seed, seed], out_indices=(seed.indices[2], seed.indices[2]))
    node, out = b.output, {}
    while True:
        if node.op is Op.ADD and node.src[0].uid in sites and node.src[1].op is Op.INPUT:
            node = node.src[0]  # a bias: the same matrix
        elif node.uid in sites:
            out[node.uid] = M
            x, w = node.src
            if w.op is Op.PERMUTE:
                w = w.src[0]
            M = B.einsum(["op", "oi", "pj"], "ij", [M, w, w], out_indices=(x.indices[1].dual(),) * 2)
            node = x
        elif node.op is Op.ELEMENTWISE and node.arg[1] == 0 and node.ndim == 2:
            fname, _, params = node.arg
            u = node.src[0]
            d = B.elementwise(fname, 1, params, u, node if E.uses_output(fname, 1) else None)
            avg = B.scale(B.einsum(["ni", "nj"], "ij", [d, d], out_indices=(u.indices[1],) * 2), 1.0 / b.N)
            M = B.mul(M, avg)
            node = u
        else:
            return out


@register_quantity("kfra", per_sample=True)
def _kfra(b):
    """Kronecker factors by KFRA's batch-averaged recursion (a chain of linear maps and
    elementwise activations, as BackPACK's KFRA): (B, A) per weight, (B,) per bias, same layout as
    kflr. Parameters off that chain are left out."""
    M = _kfra_output_factors(b)
    out = {}
    for name, (kind, z, x) in b.linear_maps.items():
        zz = z if kind == "weight" else z.src[0]
        if zz.uid not in M:
            continue
        out[f"{name}/0"] = M[zz.uid]
        if kind == "weight":
            i = x.indices[1]
            out[f"{name}/1"] = B.scale(B.einsum(["ni", "nj"], "ij", [x, x], out_indices=(i, i)), 1.0 / b.N)
    if not out:
        raise UnsupportedOpError("kfra found no linear map on a chain of linear maps and elementwise activations "
                                 "from the output")
    return out
