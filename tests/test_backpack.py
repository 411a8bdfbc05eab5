"""First-order statistics and GGN diagonals match BackPACK (conventions) on sequential models."""
from __future__ import annotations

import pytest
import torch

import hogc

from .model_cases import CASES

from backpack import backpack as bp_ctx, extend  # test dependency, installed --no-deps by `make test`
from backpack import extensions as ext

SEQUENTIAL = [c for c in CASES if c.sequential]
PAIRS = {"batch_grad": (ext.BatchGrad, "grad_batch"), "batch_l2": (ext.BatchL2Grad, "batch_l2"),
         "sum_grad_squared": (ext.SumGradSquared, "sum_grad_squared"), "variance": (ext.Variance, "variance"),
         "ggn_diag": (ext.DiagGGNExact, "diag_ggn_exact"),
         "batch_ggn_diag": (ext.BatchDiagGGNExact, "diag_ggn_exact_batch")}


@pytest.mark.parametrize("case", SEQUENTIAL, ids=lambda c: c.id)
def test_matches_backpack(case):
    model, lf, x, y = case.data()
    out = hogc.compile(model, ("grad",) + tuple(PAIRS), loss=lf)(x, y)
    model, lf = extend(model), extend(lf)
    loss = lf(model(x), y)
    with bp_ctx(*(cls() for cls, _ in PAIRS.values())):
        loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(out["grad"][name], p.grad, rtol=1e-10, atol=1e-12)
        for q, (_, attr) in PAIRS.items():
            torch.testing.assert_close(out[q][name], getattr(p, attr), rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{q} of {name}: {m}")
