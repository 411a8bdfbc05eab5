"""The optimization passes do what the docs claim: no per-sample gradient is materialized for
quantities that only need its squares, and fusion never changes a number."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hogc
from hogc.ir import Op

from .model_cases import CASES
from .test_quantities import close

N, I, H, O = 16, 30, 20, 5


def _largest_intermediate(fn) -> int:
    spec = fn._last
    return max(math.prod(n.shape) for n in spec.program.nodes if n.op is not Op.INPUT)


@pytest.mark.parametrize("quantity", ["grad", "batch_l2", "sum_grad_squared", "variance", "ggn_diag",
                                      "ggn_diag_mc"])
def test_no_per_sample_gradient_is_materialized(quantity):
    model = nn.Sequential(nn.Linear(I, H), nn.Tanh(), nn.Linear(H, O))
    fn = hogc.compile(model, quantity)
    fn(torch.randn(N, I), torch.randint(0, O, (N,)))
    # the largest weight is H x I; a per-sample gradient would be N x H x I
    assert _largest_intermediate(fn) < N * H * I // 2, fn.ir


def test_batch_l2_of_a_linear_layer_is_factorized():
    """sum_{oi} (g_no x_ni)^2 is computed as (sum_o g_no^2)(sum_i x_ni^2)."""
    model = nn.Sequential(nn.Linear(I, O))
    fn = hogc.compile(model, "batch_l2")
    fn(torch.randn(N, I), torch.randint(0, O, (N,)))
    einsums = [n for n in fn._last.program.nodes if n.op is Op.EINSUM]
    assert all(math.prod(n.shape) <= N * max(I, O) for n in einsums), fn.ir


@pytest.mark.parametrize("optimize", ["naive", "greedy", "optimal"])
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: c.id)
def test_path_strategies_agree(case, optimize):
    model, lf, x, y = case.data()
    qs = ("batch_l2", "sum_grad_squared", "ggn_diag", "batch_ggn_diag")
    ref = hogc.compile(model, qs, loss=lf, optimize="auto")(x, y)
    got = hogc.compile(model, qs, loss=lf, optimize=optimize)(x, y)
    for q in qs:
        for k in ref[q]:
            close(got[q][k], ref[q][k], rel=1e-12)


def test_unknown_path_strategy_lists_the_registered_ones():
    with pytest.raises(hogc.HogcError, match="unknown optimize strategy 'fastest'.*greedy"):
        hogc.compile(nn.Linear(2, 2), "grad", optimize="fastest")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fusion_and_paths_never_change_a_number(case):
    """The emitted program equals the unoptimized derivative program (no fusion, no path choice)."""
    from hogc.emit.fx import emit
    from hogc.quantities import QUANTITIES

    model, lf, x, y = case.data()
    qs = tuple(q for q in QUANTITIES if q not in ("ggn_diag_mc", "ggnvp", "hvp", "kflr", "kfac", "kfra"))
    fn = hogc.compile(model, qs, loss=lf)
    fn(x, y)
    spec = fn._last
    values = {("param", k): p for k, p in model.named_parameters()}
    values.update({("data", "x"): x, ("target", "y"): y})
    with torch.no_grad():
        raw = emit(spec.unoptimized, spec.inputs)(*[values[i] for i in spec.inputs])
        opt = spec.gm(*[values[i] for i in spec.inputs])
    want = dict(zip(spec.unoptimized.outputs, raw))
    got = dict(zip(spec.program.outputs, opt))
    assert want.keys() == got.keys()
    for k in want:
        close(got[k], want[k], rel=1e-12)


@pytest.mark.parametrize("quantity", ["ggn_diag", "sum_grad_squared", "batch_l2", "batch_ggn_diag"])
def test_blocked_squares_equal_the_reference(monkeypatch, quantity):
    """block_squares cuts a sum of squares of a large product into per-sample blocks (summed
    blocks add up, kept ones concatenate); with a tiny block size every such square is cut."""
    import hogc.passes.blocking as blocking
    import hogc.passes.conv as conv
    from hogc.zoo import c3d3

    from .reference import Reference

    monkeypatch.setattr(blocking, "BLOCK_BYTES", 2048)
    monkeypatch.setattr(conv, "GROUPED_MAX", 0)  # per-sample weight gradients through im2col + GEMM
    torch.manual_seed(0)
    model = c3d3(3, (3, 4, 4), (6, 5), 4, size=16).double()
    x, y = torch.randn(5, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (5,))
    fn = hogc.compile(model, quantity)
    got = fn(x, y)
    assert any("(blocks)" in " ".join(n.sliced) for n in fn.explain().networks)
    want = getattr(Reference(model, nn.CrossEntropyLoss(), x, y), quantity)()
    for k in want:
        close(got[k], want[k], rel=1e-10)
