"""The public API contract: return shapes, caching, introspection, reproducibility, packaging."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import hogc
from hogc.examples import ResidualMLP


def _data(n=6):
    torch.manual_seed(0)
    return ResidualMLP(8, 12, 4).double(), torch.randn(n, 8, dtype=torch.float64), torch.randint(0, 4, (n,))


def test_single_name_returns_the_quantity_sequence_returns_dict():
    model, x, y = _data()
    d = hogc.compile(model, "ggn_diag")(x, y)
    assert set(d) == {k for k, _ in model.named_parameters()}
    for k, p in model.named_parameters():
        assert d[k].shape == p.shape
    both = hogc.compile(model, ("loss", "batch_grad"))(x, y)
    assert set(both) == {"loss", "batch_grad"} and both["loss"].ndim == 0
    assert both["batch_grad"]["inp.weight"].shape == (6, 12, 8)


def test_default_loss_is_cross_entropy():
    model, x, y = _data()
    fn = hogc.compile(model, "loss")
    torch.testing.assert_close(fn(x, y), nn.CrossEntropyLoss()(model(x), y))


def test_programs_are_cached_per_shape_and_dtype():
    model, x, y = _data()
    fn = hogc.compile(model, "grad")
    fn(x, y)
    fn(x + 1, y)
    assert len(fn._cache) == 1
    fn(x[:3], y[:3])
    assert len(fn._cache) == 2
    m32 = ResidualMLP(8, 12, 4)
    fn32 = hogc.compile(m32, "grad")
    out = fn32(x.float(), y)
    assert out["inp.weight"].dtype == torch.float32


def test_several_quantities_share_work():
    """One compile of grad and ggn_diag runs the forward once and shares the derivative nodes of the
    activations between the gradient and the square-root backward passes (hash-consing)."""
    model, x, y = _data()
    fn = hogc.compile(model, ("grad", "ggn_diag"))
    fn(x, y)
    ir = fn.ir
    assert ir.count("elementwise[tanh](") == 2  # two residual blocks, forward once
    assert ir.count("elementwise[tanh'](") == 2  # tanh' shared by both backward passes
    assert ir.count("loss_grad[") == 1 and ir.count("loss_sqrt_hessian[") == 1


def test_parameters_are_read_at_call_time():
    model, x, y = _data()
    fn = hogc.compile(model, "loss")
    a = fn(x, y)
    with torch.no_grad():
        model.out.bias.add_(1.0)
        model.out.bias[0] += 3.0
    assert not torch.equal(a, fn(x, y))


def test_ir_and_code_are_readable():
    model, x, y = _data()
    fn = hogc.compile(model, "ggn_diag")
    fn(x, y)
    assert "loss_sqrt_hessian[cross_entropy/mean]" in fn.ir and "n.6" in fn.ir and "^12" in fn.ir
    assert "def forward" in fn.code and "torch.mm" in fn.code


def test_mc_is_reproducible_with_seed_or_generator():
    model, x, y = _data()
    a = hogc.compile(model, "ggn_diag_mc", seed=3)(x, y)
    b = hogc.compile(model, "ggn_diag_mc", seed=3)(x, y)
    c = hogc.compile(model, "ggn_diag_mc", seed=4)(x, y)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    fn = hogc.compile(model, "ggn_diag_mc")
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert all(torch.equal(u, v) for u, v in zip(fn(x, y, generator=g1).values(), fn(x, y, generator=g2).values()))


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss(), nn.BCEWithLogitsLoss(reduction="sum")],
                         ids=lambda lf: type(lf).__name__)
def test_mc_converges_to_exact_ggn_diag(loss):
    """Unbiased samplers: with many samples the MC diagonal approaches the exact one (relative error
    ~ 1/sqrt(M); 2e4 samples give about 1%, the bound is 5%)."""
    model, x, y = _data(4)
    if not isinstance(loss, nn.CrossEntropyLoss):
        y = torch.rand(4, 4, dtype=torch.float64).round() if isinstance(loss, nn.BCEWithLogitsLoss) else \
            torch.randn(4, 4, dtype=torch.float64)
    exact = hogc.compile(model, "ggn_diag", loss=loss)(x, y)
    mc = hogc.compile(model, "ggn_diag_mc", loss=loss, mc_samples=20000, seed=0)(x, y)
    num = sum(((mc[k] - exact[k]) ** 2).sum() for k in exact) ** 0.5
    den = sum((exact[k] ** 2).sum() for k in exact) ** 0.5
    assert num / den < 0.05, f"relative error {num / den:.3f}"


def test_frozen_parameters_are_left_out():
    model, x, y = _data()
    model.inp.weight.requires_grad_(False)
    out = hogc.compile(model, "grad")(x, y)
    assert "inp.weight" not in out and "inp.bias" in out


def test_frozen_parameters_and_buffers_with_numeric_names():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("lambda", torch.tensor(2.0))  # a keyword as a name

        def forward(self, x):
            return x * getattr(self, "lambda")

    model = nn.Sequential(Scale(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[1].weight.requires_grad_(False)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    out = hogc.compile(model, "grad")(x, y)
    nn.CrossEntropyLoss()(model(x), y).backward()
    assert set(out) == {"1.bias", "3.weight", "3.bias"}
    torch.testing.assert_close(out["3.weight"], model[3].weight.grad)


def test_unused_parameter_gets_zeros():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    out = hogc.compile(M(), ("grad", "batch_l2"))(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert torch.equal(out["grad"]["unused.weight"], torch.zeros(2, 3))
    assert out["batch_l2"]["unused.bias"].shape == (4,)


def test_passes_are_importable_as_hogc_passes():
    mod = importlib.import_module("hogc.passes.fuse")
    assert hasattr(mod, "fuse_einsums") and hogc.passes.__name__ == "hogc.passes"


def test_module_registered_under_two_names_keeps_its_weights():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hogc.compile(model, "grad")(x, y)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(x)  # still a working module


def test_plain_tensor_attributes_are_constants():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = torch.tensor([1.0, 2.0, 3.0])  # not a buffer

        def forward(self, x):
            return self.lin(x) * self.scale

    model = Scaled()
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    got = hogc.compile(model, "grad")(x, y)
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    torch.testing.assert_close(got["lin.weight"], model.lin.weight.grad)


def test_cache_sees_train_eval_module_swaps_and_loss_changes():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    lf = nn.CrossEntropyLoss()
    fn = hogc.compile(model, "loss", loss=lf)
    fn(x, y)
    model[1] = nn.Sigmoid()
    torch.testing.assert_close(fn(x, y), lf(model(x), y))
    lf.reduction = "sum"
    torch.testing.assert_close(fn(x, y), lf(model(x), y))
    drop = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).eval()
    fd = hogc.compile(drop, "loss")
    fd(x, y)
    evaluated = fd(x, y)
    drop.train()  # a new specialization: dropout with a random mask per call
    assert not torch.equal(fd(x, y), evaluated)
