"""Kronecker factors of the GGN blocks of linear maps: KFLR (exact) and KFAC (Monte-Carlo)."""
from __future__ import annotations

from ..errors import UnsupportedOpError
from ..ir import Node, build as B
from .builder import DerivativeBuilder
from .registry import register_quantity


def _kronecker(b: DerivativeBuilder, mc: bool) -> dict[str, Node]:
    """Per parameter of a linear map, the factors (B, A) with B (x) A approximating its GGN block:
    B = sum_{c,n} g_cn g_cn^T from the square-root backward pass (output side, lower-lower) and
    A = mean_n x_n x_n^T (input side, upper-upper); a bias gets (B,). Keys ``"<name>/<k>"``."""
    sites = b.linear_maps
    if not sites:
        raise UnsupportedOpError("no parameter is used exactly once as the weight of a linear map on a 2-d "
                                 "input (F.linear(x, W, b) or x @ W.T + b), so there are no Kronecker factors to "
                                 "compute (weights shared over positions or layers arrive with the sequence work)")
    cots = b.column_cotangents(mc, {f"z{k}": z for k, (_, z, _) in sites.items()})
    out = {}
    for name, (kind, z, x) in sites.items():
        g = cots[f"z{name}"]
        o = g.indices[2]
        out[f"{name}/0"] = B.einsum(["cno", "cnp"], "op", [g, g], out_indices=(o, o))
        if kind == "weight":
            i = x.indices[1]
            a = B.einsum(["ni", "nj"], "ij", [x, x], out_indices=(i, i))
            out[f"{name}/1"] = B.scale(a, 1.0 / b.N)
    return out


@register_quantity("kflr")
def _kflr(b):
    """Kronecker factors from the exact loss-Hessian square root (KFLR): (B, A) for weights of
    linear maps, (B,) for their biases; GGN block ~ B (x) A. Other parameters are left out."""
    return _kronecker(b, mc=False)


@register_quantity("kfac")
def _kfac(b):
    """Kronecker factors from the Monte-Carlo square root (KFAC, ``mc_samples`` columns, seeded like
    ggn_diag_mc); same layout as kflr."""
    return _kronecker(b, mc=True)
