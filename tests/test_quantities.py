"""Every registered quantity on every registry model equals a float64 torch.func reference."""
from __future__ import annotations

import math

import pytest
import torch

import hogc
from hogc.emit import runtime as R
from hogc.emit.random import draw_seed
from hogc.quantities import QUANTITIES

from .model_cases import CASES
from .reference import Reference

#: quantities defined for every model (Kronecker factors need linear maps: tests/test_kronecker.py)
GENERAL = tuple(q for q in QUANTITIES if q not in ("kflr", "kfac", "kfra") and not q.startswith("partition_"))
#: quantities whose reference is a method of Reference taking no arguments
EXACT = [q for q in GENERAL if q not in ("ggn_diag_mc", "ggnvp", "ggn_eigen", "hvp")]
TOP_K = 3


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def assert_matches(got: dict, ref: Reference, quantities, name=lambda k: k) -> None:
    """Each per-parameter quantity in ``got`` equals the reference's (``name`` maps the reference's
    parameter names to hogc's)."""
    for q in quantities:
        want = getattr(ref, q)()
        for k in want:
            close(got[q][name(k)], want[k])


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def compiled(request):
    case = request.param
    model, lf, x, y = case.data()
    fn = hogc.compile(model, GENERAL, loss=lf, mc_samples=3, seed=7, top_k=TOP_K)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    ref = Reference(model, lf, x, y)
    ref.v = v
    return case, fn(x, y, v), ref, fn


@pytest.mark.parametrize("quantity", EXACT)
def test_quantity_matches_torch_func(compiled, quantity):
    case, out, ref, _ = compiled
    got, want = out[quantity], getattr(ref, quantity)()
    if not isinstance(want, dict):
        close(got, want)
        return
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k])


@pytest.mark.parametrize("batch,total", [("batch_grad", "grad"), ("batch_ggn_diag", "ggn_diag"),
                                         ("batch_hessian_diag", "hessian_diag")])
def test_batch_quantities_sum_to_batch_counterpart(compiled, batch, total):
    _, out, _, _ = compiled
    for k in out[total]:
        close(out[batch][k].sum(0), out[total][k])


def test_ggnvp_matches_ggn_times_v(compiled):
    _, out, ref, _ = compiled
    want = ref.ggnvp(ref.v)
    for k in want:
        close(out["ggnvp"][k], want[k])


def test_hvp_matches_hessian_times_v(compiled):
    _, out, ref, _ = compiled
    flat = torch.cat([ref.v[k].flatten() for k in ref.params])
    got = torch.cat([out["hvp"][k].flatten() for k in ref.params])
    close(got, out["hessian"] @ flat)
    want = ref.hvp(ref.v)
    for k in want:
        close(out["hvp"][k], want[k])


def test_ggn_eigen_are_the_top_eigenvalues(compiled):
    _, out, ref, _ = compiled
    want = ref.ggn_eigen(TOP_K)
    close(out["ggn_eigen"], want[: out["ggn_eigen"].shape[0]])


def test_ggn_from_sqrt_ggn_equals_ggn(compiled):
    """V V^T = GGN, and the blocks are the diagonal blocks of the full matrix."""
    _, out, _, _ = compiled
    V = torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in out["sqrt_ggn"].values()], 2)
    close(torch.einsum("cna,cnb->ab", V, V), out["ggn"])
    s = 0
    for k, blk in out["ggn_block"].items():
        P = blk.shape[0]
        close(out["ggn"][s:s + P, s:s + P], blk)
        s += P


def test_loss_hessian_square_root(compiled):
    """sum_c S_c S_c^T is the Hessian of each sample's loss share w.r.t. its output."""
    from hogc.emit import runtime as R

    _, _, ref, _ = compiled
    S = R.loss_sqrt_hessian(ref.out, ref.y, *ref.spec())
    Sf = S.reshape(S.shape[0], S.shape[1], -1)
    close(torch.einsum("cno,cnp->nop", Sf, Sf), ref.output_hessians())


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3), (2, 2), (4, 1)], ids=["rows", "positions", "C=2", "C=1"])
def test_cross_entropy_factor_has_rank_c_minus_1(shape):
    """The reduced factor (C - 1 columns per position, a Householder basis) and BackPACK's C-column one
    both give diag(p) - p p^T per position, also where one class takes all the probability."""
    from hogc.capture.losses import loss_spec, num_columns

    torch.manual_seed(0)
    f = torch.randn(shape, dtype=torch.float64) * 3
    f[0, -1] = 60.0  # p -> e_C: the reflection's pivot; and p -> 0 elsewhere
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    spec = loss_spec(torch.nn.CrossEntropyLoss())
    K, full = num_columns(spec, shape), num_columns(spec, shape, full=True)
    C = shape[1]
    assert full == math.prod(shape[1:]) and K == (full // C * (C - 1) if C > 1 else full)
    want = torch.func.hessian(lambda z: torch.nn.functional.cross_entropy(z, y))(f).reshape(
        shape[0], full, shape[0], full).diagonal(dim1=0, dim2=2).movedim(-1, 0)  # per sample (N, o, o')
    for cols in (K, full):
        S = R.loss_sqrt_hessian(f, y, "cross_entropy", "mean", -100, 0.0, cols)
        assert S.shape == (cols,) + shape and torch.isfinite(S).all()
        Sf = S.reshape(cols, shape[0], -1)
        close(torch.einsum("cno,cnp->nop", Sf, Sf), want)


def test_ggn_eigen_past_the_rank_of_c_minus_1_columns_is_zero():
    """With C - 1 columns the Gram matrix is smaller than BackPACK's; the eigenvalues past it are
    the GGN's exact zeros, so top_k still gets top_k values."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    out = hogc.compile(m, ["ggn_eigen", "ggn"], top_k=5)(x, y)
    want = torch.linalg.eigvalsh(out["ggn"]).flip(0)[:5]
    assert out["ggn_eigen"].shape == (5,)
    close(out["ggn_eigen"], want)


def test_ggn_diag_mc_is_exact_for_its_draws(compiled):
    """The MC estimate equals sum_mn (J_n^T s_mn)^2 for the very draws the program made."""
    case, out, ref, fn = compiled
    seed = draw_seed(torch.Generator().manual_seed(7), "cpu")  # the seed the call drew
    S = R.loss_sqrt_hessian_mc(ref.out, ref.y, seed, fn.spec.kind, fn.spec.reduction, 3)
    want = ref.mc_diag_given(S)
    for k in want:
        close(out["ggn_diag_mc"][k], want[k])


def test_batch_l2_is_norm_of_batch_grad(compiled):
    _, out, _, _ = compiled
    for k, g in out["batch_grad"].items():
        close(out["batch_l2"][k], (g**2).flatten(1).sum(1))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_batch_of_one(case):
    """N = 1: the sample axis has size 1 and must not be mistaken for a broadcast axis."""
    one = type(case)(case.id, case.make, case.loss, (1,) + case.x_shape[1:])
    model, lf, x, y = one.data()
    out = hogc.compile(model, tuple(q for q in EXACT if q != "ggn"), loss=lf)(x, y)
    ref = Reference(model, lf, x, y)
    for q in (q for q in EXACT if q != "ggn"):
        want = getattr(ref, q)()
        if not isinstance(want, dict):
            close(out[q], want)
            continue
        for k in want:
            close(out[q][k], want[k])
