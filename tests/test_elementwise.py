"""Parametrized over the elementwise registry: a new function is tested the moment it is registered."""
from __future__ import annotations

import pytest
import sympy as sp
import torch
from torch.func import grad, vmap

from hogc.passes import elementwise as E

CASES = [(name, order) for name in E.ELEMENTWISE_FNS for order in range(1, E.MAX_ORDER + 1)]


def _points(fn: E.ElementwiseFn) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g, dtype=torch.float64) * 2
    if fn.domain == "positive":
        x = x.abs() + 0.2
    return x[x.abs() > 1e-3]  # stay off kinks


@pytest.mark.parametrize("name,order", CASES, ids=[f"{n}-d{o}" for n, o in CASES])
def test_derivative_matches_autograd(name, order):
    fn = E.ELEMENTWISE_FNS[name]
    x = _points(fn)
    f = lambda t: fn.forward(t, *fn.example_params)  # noqa: E731
    ref = f
    for _ in range(order):
        ref = grad(ref)
    want = vmap(ref)(x)
    y = f(x)
    got = E.derivative(name, order)(x, y, *fn.example_params)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(E.ELEMENTWISE_FNS))
def test_forward_matches_sympy_expression(name):
    """The native forward and the sympy expression describe the same function."""
    fn = E.ELEMENTWISE_FNS[name]
    x = _points(fn)
    expr = fn.expr.subs({sp.Symbol(k, real=True): v for k, v in zip(fn.params, fn.example_params)})
    want = torch.tensor([float(expr.subs(E.x, float(v)).evalf()) for v in x[:8]], dtype=torch.float64)
    got = fn.forward(x[:8], *fn.example_params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,uses_y", [("tanh", True), ("sigmoid", True), ("exp", True)])
def test_cheap_derivatives_are_written_in_the_output(name, uses_y):
    e = E.derivative_expr(name, 1)
    assert e.has(E.y) is uses_y and not e.has(E.x), e


def test_duplicate_registration_fails():
    with pytest.raises(ValueError, match="already registered"):
        E.register_elementwise("tanh", sp.tanh(E.x), torch.tanh)
