"""hogc.optim.PartitionNewton: the rates solve their model problems, and training lowers the loss."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hogc
from hogc.optim import PartitionNewton, cubic_step, newton_step


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, x, y


def test_newton_and_cubic_steps_solve_their_models():
    torch.manual_seed(1)
    A = torch.randn(4, 4, dtype=torch.float64)
    H = A @ A.T + torch.eye(4, dtype=torch.float64)
    g = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(H @ newton_step(g, H), g)
    d = torch.rand(4, dtype=torch.float64) + 0.5
    for Hc in (H, H - 2.5 * torch.eye(4, dtype=torch.float64)):  # also an indefinite H
        eta = cubic_step(g, Hc, d, lam=2.0)
        r = torch.linalg.norm(d * eta)
        # stationarity of -g.eta + eta H eta / 2 + lam / 6 |D eta|^3
        torch.testing.assert_close(Hc @ eta + 0.5 * 2.0 * r * d * d * eta, g, atol=1e-8, rtol=1e-8)
        assert torch.linalg.eigvalsh(Hc + r * torch.diag(d * d)).min() > -1e-10


@pytest.mark.parametrize("order", [2, 3])
def test_rates_come_from_the_partition_tensors(order):
    model, x, y = _problem()
    opt = PartitionNewton(model, nn.CrossEntropyLoss(), partition="module", order=order, max_rate=1e9)
    out = hogc.compile(model, ("partition_grad", "partition_hessian", "partition_d3"), partition="module")(x, y)
    g, H = out["partition_grad"], out["partition_hessian"]
    want = newton_step(g, H, 1e-8) if order == 2 else \
        cubic_step(g, H, out["partition_d3"].diagonal(0, 0, 1).diagonal(0, 0, 1).abs().pow(1 / 3))
    torch.testing.assert_close(opt.compute_rates(x, y), want.clamp(0.0, 1e9))


@pytest.mark.parametrize("order", [2, 3])
def test_training_lowers_the_loss(order):
    model, x, y = _problem()
    lf = nn.CrossEntropyLoss()
    opt = PartitionNewton(model, lf, partition="module", order=order, every=5, beta=0.5)
    assert isinstance(opt, torch.optim.Optimizer)
    start = lf(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = lf(model(x), y)
        loss.backward()
        opt.step(batch=(x, y))
    assert lf(model(x), y).item() < 0.8 * start
    assert opt.rates is not None and (opt.rates >= 0).all()


def test_bad_settings_and_missing_batch():
    model, x, y = _problem()
    with pytest.raises(hogc.HogcError, match="order must be 2 or 3"):
        PartitionNewton(model, order=4)
    opt = PartitionNewton(model)
    with pytest.raises(hogc.HogcError, match="needs batch="):
        opt.step()


def test_state_dict_round_trip_keeps_rates_and_schedule():
    model, x, y = _problem()
    lf = nn.CrossEntropyLoss()
    opt = PartitionNewton(model, lf, every=3, beta=0.5)
    for _ in range(2):
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step(batch=(x, y))
    fresh = PartitionNewton(model, lf, every=3, beta=0.5)
    fresh.load_state_dict(opt.state_dict())
    torch.testing.assert_close(fresh.rates, opt.rates)
    assert fresh.steps == 2
    fresh.zero_grad()
    lf(model(x), y).backward()
    fresh.step()  # step 2 is not a recomputation: no batch needed
