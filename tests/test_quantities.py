"""Every registered quantity on every registry model equals a float64 torch.func reference."""
from __future__ import annotations

import pytest
import torch

import hogc
from hogc.emit import runtime as R
from hogc.quantities import QUANTITIES

from .model_cases import CASES
from .reference import Reference

EXACT = [q for q in QUANTITIES if q != "ggn_diag_mc"]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def compiled(request):
    case = request.param
    model, lf, x, y = case.data()
    fn = hogc.compile(model, tuple(QUANTITIES), loss=lf, mc_samples=3, seed=7)
    return case, fn(x, y), Reference(model, lf, x, y), fn


@pytest.mark.parametrize("quantity", EXACT)
def test_quantity_matches_torch_func(compiled, quantity):
    case, out, ref, _ = compiled
    got, want = out[quantity], getattr(ref, quantity)()
    if quantity == "loss":
        close(got, want)
        return
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k])


@pytest.mark.parametrize("batch,total", [("batch_grad", "grad"), ("batch_ggn_diag", "ggn_diag")])
def test_batch_quantities_sum_to_batch_counterpart(compiled, batch, total):
    _, out, _, _ = compiled
    for k in out[total]:
        close(out[batch][k].sum(0), out[total][k])


def test_ggn_diag_mc_is_exact_for_its_draws(compiled):
    """The MC estimate equals sum_mn (J_n^T s_mn)^2 for the very draws the program made."""
    case, out, ref, fn = compiled
    g = torch.Generator().manual_seed(7)
    S = R.loss_sqrt_hessian_mc(ref.out, ref.y, g, fn.spec.kind, fn.spec.reduction, 3)
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
    out = hogc.compile(model, tuple(EXACT), loss=lf)(x, y)
    ref = Reference(model, lf, x, y)
    for q in EXACT:
        want = getattr(ref, q)()
        if q == "loss":
            close(out[q], want)
            continue
        for k in want:
            close(out[q][k], want[k])
