"""backend=: the emitted program handed to torch.compile (Inductor) equals the eager program, and
it is captured whole (no graph breaks) on every zoo model."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import hogc
from hogc.zoo import c3d3

from .test_quantities import GENERAL, TOP_K
from .test_zoo import ZOO


def _same(a, b, rel=1e-4):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same(a[k], b[k], rel)
        return
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            _same(x, y, rel)
        return
    scale = max(float(b.abs().max()), 1e-12) if b.numel() else 1.0
    assert float((a - b).abs().max()) <= rel * scale


def _vector(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(hogc.HogcError, match="unknown backend 'tvm'"):
        hogc.compile(nn.Linear(2, 2), "grad", backend="tvm")


def test_auto_is_eager_on_the_cpu():
    fn = hogc.compile(nn.Linear(3, 2), "grad", backend="auto")
    fn(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert fn.explain().strategies["backend"].startswith("eager")
    assert fn._require().run is fn._require().gm


@pytest.mark.parametrize("case", ["mlp", "c3d3"])
def test_inductor_equals_eager(case):
    """One Inductor compile per model (C++ kernels on the CPU), float32; the MLP's program also
    holds Hessian, Kronecker and matrix-free quantities."""
    torch.manual_seed(0)
    if case == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        qs = ("grad", "batch_l2", "ggn_diag", "hessian_diag", "kflr", "ggnvp")
    else:
        model = c3d3(3, (3, 4, 4), (6, 5), 4, size=16)
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
        qs = ("grad", "ggn_diag")
    v = _vector(model) if case == "mlp" else None
    want = hogc.compile(model, qs)(x, y, v)
    fn = hogc.compile(model, qs, backend="inductor")
    got = fn(x, y, v)
    assert fn.explain().strategies["backend"].startswith("inductor: torch.compile(fullgraph=True")
    assert fn._require().run is not fn._require().gm
    _same(got, want)
    _same(fn(x, y, v), want)  # the compiled program is cached with the specialization


def test_inductor_with_random_draws_is_one_graph_and_equals_eager():
    """Monte-Carlo columns and dropout masks are tensor arithmetic on a seed input (hogc.emit.random):
    the program compiles as one graph (fullgraph=True) and the same seed gives eager's numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 3)).train()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    qs = ("ggn_diag_mc", "grad")
    want = hogc.compile(model, qs, mc_samples=3, seed=4)(x, y)
    fn = hogc.compile(model, qs, mc_samples=3, seed=4, backend="inductor")
    _same(fn(x, y), want)
    assert fn.explain().strategies["backend"].startswith("inductor: torch.compile(fullgraph=True")


@pytest.mark.parametrize("zoo", ZOO, ids=lambda z: z.id)
def test_zoo_programs_are_one_graph(zoo):
    """Every deterministic quantity of every zoo model in one program: Dynamo captures it as one
    graph (fullgraph=True raises at any break; this graph is what torch.compile hands to
    Inductor), and that graph computes the eager program's numbers."""
    model, lf, x, y = zoo.data()
    qs = [q for q in GENERAL if q != "ggn_diag_mc"]
    fn = hogc.compile(model, qs, loss=lf, top_k=TOP_K)
    spec, args = fn._arguments(x, y, _vector(model))
    dynamo.reset()
    with torch.no_grad():
        want = spec.gm(*args)
        got = torch.compile(spec.gm, backend="eager", fullgraph=True)(*args)  # raises at a graph break
    for a, b in zip(got, want):
        _same(a, b, rel=1e-10)
