"""Properties of the Hessian quantities beyond the torch.func comparisons in test_quantities."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hogc

from .test_quantities import close


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=lambda lf: type(lf).__name__)
def test_hessian_equals_ggn_on_piecewise_linear_networks(loss):
    """With ReLU-type activations (second derivative zero almost everywhere) the residual terms of
    each layer vanish: every parameter's Hessian block and diagonal equal the GGN's. Blocks that
    couple two layers keep a residual (the output is bilinear in (W1, W2)), so the full matrices differ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,)) if isinstance(loss, nn.CrossEntropyLoss) else torch.randn(7, 3, dtype=torch.float64)
    qs = ("hessian_block", "ggn_block", "hessian_diag", "ggn_diag", "batch_hessian_diag", "batch_ggn_diag",
          "hessian", "ggn")
    out = hogc.compile(model, qs, loss=loss)(x, y)
    for k in out["ggn_diag"]:
        close(out["hessian_block"][k], out["ggn_block"][k])
        close(out["hessian_diag"][k], out["ggn_diag"][k])
        close(out["batch_hessian_diag"][k], out["batch_ggn_diag"][k])
    assert (out["hessian"] - out["ggn"]).abs().max() > 1e-3  # the cross-layer residual


def test_hessian_differs_from_ggn_with_curved_activations():
    """The residual terms are there: with tanh the Hessian is not the GGN (and is not PSD)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    out = hogc.compile(model, ("hessian", "ggn"))(x, y)
    assert (out["hessian"] - out["ggn"]).abs().max() > 1e-3
    assert torch.linalg.eigvalsh(out["ggn"]).min() > -1e-12


def test_hessian_is_symmetric():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    H = hogc.compile(model, "hessian")(x, y)
    close(H, H.T, rel=1e-14)


def test_large_blocks_are_refused_with_advice():
    model = nn.Sequential(nn.Linear(200, 50))  # a 10 000-entry weight
    fn = hogc.compile(model, "hessian_block")
    with pytest.raises(hogc.HogcError, match=r"'0.weight' has 10000 entries.*Use hvp, or the GGN quantities"):
        fn(torch.randn(3, 200), torch.randint(0, 50, (3,)))


class _SharedDeep(nn.Module):
    """One large weight feeds two factors of a product: Hessian backpropagation does not apply."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(100, 100)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_hessian_diag_uses_backpropagation_where_it_applies():
    """A deep sigmoid MLP with 100k-entry layers gets its exact diagonal (Hessian backpropagation);
    a weight shared across depth falls back to forward-over-reverse and is refused when large."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(400, 250), nn.Sigmoid(), nn.Linear(250, 10))
    out = hogc.compile(mlp, ("hessian_diag", "ggn_diag"))(torch.randn(4, 400), torch.randint(0, 10, (4,)))
    assert out["hessian_diag"]["0.weight"].shape == (250, 400)
    with pytest.raises(hogc.HogcError, match="'lin.weight' has 10000 entries"):
        hogc.compile(_SharedDeep(), "hessian_diag")(torch.randn(3, 100), torch.randint(0, 100, (3,)))


def test_float32_hessian_quantities_keep_the_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    out = hogc.compile(model, ("hessian_diag", "batch_hessian_diag", "hessian_block", "hessian"))(x, y)
    assert out["hessian"].dtype == torch.float32
    for q in ("hessian_diag", "batch_hessian_diag", "hessian_block"):
        assert all(t.dtype == torch.float32 for t in out[q].values())
    torch.testing.assert_close(out["batch_hessian_diag"]["0.weight"].sum(0), out["hessian_diag"]["0.weight"])


def test_oversized_results_are_refused():
    big = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(2, 784), torch.randint(0, 10, (2,))
    with pytest.raises(hogc.HogcError, match="GGN block of 0.weight has .* entries"):
        hogc.compile(big, "ggn_block")(x, y)
    with pytest.raises(hogc.HogcError, match="the full GGN of the model"):
        hogc.compile(big, "ggn")(x, y)


def test_ggn_eigen_returns_at_most_the_rank_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()  # D = 8 < C N = 2 * 40
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    out = hogc.compile(model, ("ggn_eigen", "ggn"), loss=nn.MSELoss(), top_k=20)(x, y)
    assert out["ggn_eigen"].shape == (8,)
    close(out["ggn_eigen"], torch.linalg.eigvalsh(out["ggn"]).flip(0))


def test_explain_says_which_strategy_and_why():
    mlp = nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3))
    fn = hogc.compile(mlp, ("hessian_diag", "batch_l2"))
    fn(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    ex = fn.explain()
    assert ex.strategies["hessian_diag"].startswith("Hessian backpropagation")
    assert "1 curved-activation residuals (columns per sample: 6)" in ex.strategies["hessian_diag"]
    assert ex.contractions and ex.total_flops == sum(c.flops for c in ex.contractions)
    assert "strategies:" in str(ex) and "FLOPs" in str(ex)
    fn = hogc.compile(_SharedDeep(), "hessian_diag")
    with pytest.raises(hogc.HogcError):
        fn.explain()  # nothing compiled yet
    small = type(_SharedDeep())()
    small.lin = nn.Linear(5, 5)
    fs = hogc.compile(small, "hessian_diag")
    fs(torch.randn(3, 5), torch.randint(0, 5, (3,)))
    assert "forward-over-reverse" in fs.explain().strategies["hessian_diag"]
    assert "two factors of one product" in fs.explain().strategies["hessian_diag"]


def test_cost_model_picks_the_cheaper_exact_strategy():
    """Both strategies are exact; the one with fewer predicted operations is chosen and reported."""
    import re

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    fn = hogc.compile(mlp, "hessian_diag")
    fn(x, y)
    note = fn.explain().strategies["hessian_diag"]
    costs = dict((k, float(v)) for k, v in re.findall(r"(Hessian backpropagation|forward-over-reverse) ([0-9.e+]+)",
                                                        note.split("predicted operations:")[1]))
    assert set(costs) == {"Hessian backpropagation", "forward-over-reverse"}
    assert note.startswith(min(costs, key=costs.get))


def test_missing_second_order_rule_names_the_op(monkeypatch):
    from hogc.ir import Op
    from hogc.passes import residual_rules

    monkeypatch.delitem(residual_rules.residual_kinds, Op.ELEMENTWISE)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(hogc.MissingRuleError, match="no second-order residual rule for op ELEMENTWISE"):
        hogc.compile(model, "hessian_diag")(torch.randn(5, 3), torch.randint(0, 2, (5,)))
