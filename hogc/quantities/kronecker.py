"""Kronecker factors of the GGN blocks of linear maps: KFLR (exact), KFAC (Monte-Carlo) and
KFRA (batch-averaged recursion)."""
from __future__ import annotations

import math

from hogc.passes import elementwise as E

from ..capture.losses import num_columns
from ..errors import UnsupportedOpError
from ..ir import COLUMN, Index, Node, Op, Variance, build as B, dual
from .builder import DerivativeBuilder, sum_parts
from .registry import register_quantity


#: How factors treat positions a weight is shared over (a sequence, a convolution's output
#: positions); Eschenhagen et al. (2023), "Kronecker-Factored Approximate Curvature for Modern
#: Neural Network Architectures". None: BackPACK's convention for convolutions, expand otherwise.
KFAC_APPROX = ("expand", "reduce")


def _output_factor(g: Node, o: int, approx: str) -> Node:
    """B over the cotangent g (c, n, ...) with the output channel at axis o, the rest positions:
    ``expand`` sums g g^T over columns, samples and positions; ``reduce`` (and BackPACK's
    convolution convention) sums over positions first: (sum_t g_t)(sum_t g_t)^T."""
    pos = [a for a in range(2, g.ndim) if a != o]
    L = B.letters(g.ndim + 1 + len(pos))
    s1 = L[:g.ndim]
    fresh = dict(zip(pos, L[g.ndim + 1:])) if approx != "expand" else {}
    s2 = "".join(L[g.ndim] if a == o else fresh.get(a, s1[a]) for a in range(g.ndim))
    # summing positions is basis-dependent (a contraction with ones): metric letters
    metric = "".join(s1[a] for a in pos) + "".join(fresh.values())
    return B.einsum([s1, s2], s1[o] + L[g.ndim], [g, g], metric=metric, out_indices=(g.indices[o], g.indices[o]))


def _input_factor(x: Node, feat: list[int], approx: str, N: int) -> Node:
    """A over the input x (n, ...) with feature axes ``feat``, the rest positions (T of them):
    ``expand``: sum_{n,t} x x^T / (N T); ``reduce``: sum_n (mean_t x)(mean_t x)^T / N; BackPACK's
    convolution convention: sum_{n,t} x x^T / N. Feature axes flattened into one: (F, F)."""
    pos = [a for a in range(1, x.ndim) if a not in feat]
    T = math.prod(x.shape[a] for a in pos)
    L = B.letters(x.ndim + len(feat) + (len(pos) if approx == "reduce" else 0))
    s1 = L[:x.ndim]
    fresh = iter(L[x.ndim:])
    s2 = "".join(next(fresh) if (a in feat or (approx == "reduce" and a in pos)) else s1[a] for a in range(x.ndim))
    out = "".join(s1[a] for a in feat) + "".join(s2[a] for a in feat)
    metric = "".join(s1[a] for a in pos) + ("".join(s2[a] for a in pos) if approx == "reduce" else "")
    A = B.einsum([s1, s2], out, [x, x], metric=metric)
    scale = {"expand": 1.0 / (N * T), "reduce": 1.0 / (N * T * T)}.get(approx, 1.0 / N)
    F = math.prod(x.shape[a] for a in feat)
    return B.reshape(B.scale(A, scale), (F, F)) if len(feat) > 1 else B.scale(A, scale)


def _kronecker(b: DerivativeBuilder, mc: bool) -> dict[str, Node]:
    """Per parameter of a linear map or convolution, the factors (B, A) with B (x) A approximating
    its GGN block: B from the square-root backward pass (output side, lower-lower), A from the
    layer input (input side, upper-upper); a bias gets (B,). Keys ``"<name>/<k>"``. Over positions
    a weight is shared over, ``b.kfac_approx`` picks expand or reduce (``KFAC_APPROX``)."""
    sites = b.linear_maps
    convs = b.conv_maps
    if not sites and not convs:
        raise UnsupportedOpError("no parameter is used exactly once as the weight of a linear map (F.linear(x, W, "
                                 "b) or x @ W.T + b) or of a one-group convolution, so there are no Kronecker "
                                 "factors to compute")
    maps = sites | convs
    approx = {name: b.kfac_approx or ("backpack" if kind.startswith("conv") else "expand")
              for name, (kind, _, _) in maps.items()}

    def output_factors(cots):  # g: (c, n, ...): linear (c, n, *positions, C_out), conv (c, n, C_out, *positions)
        return {f"{name}/0": _output_factor(g := cots[f"z{name}"], 2 if kind.startswith("conv") else g.ndim - 1,
                                            approx[name]) for name, (kind, _, _) in maps.items()}

    # output-side factors sum over the square-root columns: one part per column chunk
    out = sum_parts([output_factors(cots) for cots in
                     b.column_cotangents(mc, {f"z{k}": z for k, (_, z, _) in maps.items()})])
    for name, (kind, z, x) in maps.items():
        if kind == "conv_weight":  # x is the unfolded input (n, C_in, *taps, *positions)
            d = (x.ndim - 2) // 2
            out[f"{name}/1"] = _input_factor(x, list(range(1, 2 + d)), approx[name], b.N)
        elif kind == "weight":
            out[f"{name}/1"] = _input_factor(x, [x.ndim - 1], approx[name], b.N)
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
        if zz.ndim != 2:
            continue  # weights shared over positions are off KFRA's chain
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
