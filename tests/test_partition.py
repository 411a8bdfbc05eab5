"""Partition-level derivatives (issue 5): equal to nested torch.func references in float64 on the
model registry, for several partitions (in depth order and reversed) and directions."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

import hogc

from .model_cases import CASES
from .reference import Reference
from .test_quantities import close

QS = ("partition_grad", "partition_hessian")
ALL = QS + ("partition_d3", "partition_d3_diag")


def _reference(model, lf, x, y, part, u=None):
    """g_s = u_s^T g and H_st = u_s^T H u_t from torch.func's gradient and full Hessian."""
    ref = Reference(model, lf, x, y)
    g = ref.grad()
    u = g if u is None else u
    H = ref.hessian()
    cols = []
    for sub in part:
        cols.append(torch.cat([(u[k] if k in sub else torch.zeros_like(p)).flatten() for k, p in ref.params.items()]))
    U = torch.stack(cols, 1)  # (D, S)
    gflat = torch.cat([g[k].flatten() for k in ref.params])
    return U.T @ gflat, U.T @ H @ U


def _partitions(model):
    names = [k for k, _ in model.named_parameters()]
    half = len(names) // 2 or 1
    return {"parameter": [[k] for k in names],
            "module": None,
            "two": [names[:half], names[half:]] if names[half:] else [names[:half]],
            "partial": [names[:1]] + ([names[2:]] if names[2:] else [])}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_partition_tensors_match_torch_func(case):
    model, lf, x, y = case.data()
    g = torch.Generator().manual_seed(2)
    rand = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    for name, part in _partitions(model).items():
        arg = "module" if part is None else part
        if part is None:
            part = hogc.api.resolve_partition(model, "module")
        partial = name == "partial"
        for u in (None, rand):
            direction = None if u is None else {k: u[k] for sub in part for k in sub}
            got = hogc.compile(model, QS, loss=lf, partition=arg, direction=direction, allow_partial=partial)(x, y)
            gs, H = _reference(model, lf, x, y, part, u)
            close(got["partition_grad"], gs)
            close(got["partition_hessian"], H)
            close(got["partition_hessian"], got["partition_hessian"].T)  # symmetric


def test_module_partition_groups_by_module():
    model = CASES[5].data()[0]
    part = hogc.api.resolve_partition(model, "module")
    assert all(len({k.rpartition(".")[0] for k in s}) == 1 for s in part)
    assert sorted(k for s in part for k in s) == sorted(k for k, _ in model.named_parameters())


def _along(model, lf, x, y, part, eta):
    """h -> L(theta + h U eta) with u the gradient."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: lf(functional_call(model, p, (x,)), y))(params)

    def at(h):
        p = dict(params)
        for j, sub in enumerate(part):
            for k in sub:
                p[k] = params[k] + h * eta[j] * g[k]
        return lf(functional_call(model, p, (x,)), y)
    return at


def _two_layers(qs, eta):
    """The quantities of a two-layer MLP with one subset per layer, and h -> L(theta + h U eta)."""
    model, lf, x, y = CASES[0].data()
    part = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    return hogc.compile(model, qs, loss=lf, partition=part)(x, y), _along(model, lf, x, y, part, eta)


def test_partition_quadratic_model_of_the_loss():
    """L(theta + U eta) = L + g^T eta + eta^T H eta / 2 + O(|eta|^3): a finite-difference check."""
    eta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    out, at = _two_layers(QS, eta)
    for h in (1e-2, 5e-3):
        model_val = at(0.0) + h * out["partition_grad"] @ eta + h * h * eta @ out["partition_hessian"] @ eta / 2
        assert abs(at(h) - model_val) < 5 * h ** 3 * (1 + abs(at(0.0)))


@pytest.mark.parametrize("partition, match", [
    ([["nope"]], "names 'nope', which is not a trainable parameter"),
    ([["0.weight"], ["0.weight", "0.bias"]], "overlap in '0.weight'"),
    ([["0.weight"]], r"leaves out \['0.bias'"),
    ("layers", "partition must be 'module', 'parameter' or a non-empty list"),
    ([[]], "non-empty list of non-empty lists"),
])
def test_bad_partitions_are_named(partition, match):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
    with pytest.raises(hogc.HogcError, match=match):
        hogc.compile(model, "partition_grad", partition=partition)


def test_partition_arguments_need_partition_quantities_and_full_directions():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(hogc.HogcError, match="only apply to the partition_"):
        hogc.compile(model, "grad", partition="module")
    with pytest.raises(hogc.HogcError, match=r"direction has no entry for \['0.bias'\]"):
        hogc.compile(model, "partition_grad", direction={"0.weight": torch.zeros(2, 3)})
    with pytest.raises(hogc.HogcError, match="unknown partition_strategy 'sparse'"):
        hogc.compile(model, "partition_d3", partition_strategy="sparse")
    with pytest.raises(hogc.HogcError, match="only apply to the partition_"):
        hogc.compile(model, "grad", partition_strategy="dense")


def _phi_derivatives(model, lf, x, y, part, u=None):
    """Derivatives of phi(eta) = L(theta + U eta) at 0 by nested torch.func (jacrev, jacfwd,
    jacfwd): an independent reference for all three tensors."""
    from torch.func import jacfwd, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return lf(functional_call(model, p, (x,)), y)

    u = grad(loss)(params) if u is None else u

    def phi(eta):
        p = dict(params)
        for j, sub in enumerate(part):
            for k in sub:
                p[k] = params[k] + eta[j] * u[k]
        return loss(p)

    eta = torch.zeros(len(part), dtype=torch.float64)
    return jacrev(phi)(eta), jacfwd(jacrev(phi))(eta), jacfwd(jacfwd(jacrev(phi)))(eta)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_partition_d3_matches_nested_torch_func(case):
    model, lf, x, y = case.data()
    names = [k for k, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(4)
    rand = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    # the subsets in depth order, reversed (only the cost depends on the order), partial; both strategies
    per_param = [[k] for k in names]
    for part, u, partial, strategy in ((per_param, None, False, "unrolled"), (per_param[::-1], rand, False, "unrolled"),
                                       ([names[:2], names[3:]], rand, True, "unrolled"),
                                       (per_param, None, False, "dense"), ([names[3:], names[:2]], rand, True, "dense")):
        part = [sub for sub in part if sub]
        direction = None if u is None else {k: u[k] for sub in part for k in sub}
        fn = hogc.compile(model, ALL, loss=lf, partition=part, direction=direction, allow_partial=partial,
                          partition_strategy=strategy)
        got = fn(x, y)
        assert fn.explain().strategies["partition_d3"].startswith(strategy)
        g1, g2, g3 = _phi_derivatives(model, lf, x, y, part, u)
        close(got["partition_grad"], g1)
        close(got["partition_hessian"], g2)
        close(got["partition_d3"], g3)
        close(got["partition_d3_diag"], torch.diagonal(torch.diagonal(g3), 0, 0, 1))
        d3 = got["partition_d3"]
        for perm in ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
            close(d3.permute(perm), d3)  # symmetric in all index permutations


def test_partition_cubic_model_of_the_loss():
    """phi(h eta) - (phi(0) + h g.eta + h^2 eta H eta / 2 + h^3 D[eta, eta, eta] / 6) = O(h^4)."""
    eta = torch.tensor([0.7, -0.4], dtype=torch.float64)
    out, at = _two_layers(ALL, eta)

    def err(h):
        cubic = torch.einsum("stv,s,t,v->", out["partition_d3"], eta, eta, eta)
        return abs(at(h) - (at(0.0) + h * out["partition_grad"] @ eta
                            + h ** 2 * eta @ out["partition_hessian"] @ eta / 2 + h ** 3 * cubic / 6))

    e1, e2 = err(0.2), err(0.1)
    assert e2 < e1 / 10  # fourth order: halving h divides the error by about 16


@pytest.mark.parametrize("columns", [None, 2], ids=["full", "rank C-1"])
def test_sqrt_hessian_jvp_is_finite_when_a_probability_underflows(columns):
    from hogc.emit import runtime as R

    f = torch.tensor([[0.0, 200.0, -300.0]])  # float32: exp(-300) and exp(-200) underflow to 0
    t = torch.randn(2, 1, 3)
    got = R.loss_sqrt_hessian_jvp(f, torch.tensor([1]), t, "cross_entropy", "sum", -100, 0.0, columns)
    assert torch.isfinite(got).all()
    f64, t64 = f.double().clamp(-30, 30), t.double()  # no underflow: the limit value agrees with jvp
    got = R.loss_sqrt_hessian_jvp(f64, torch.tensor([1]), t64, "cross_entropy", "sum", -100, 0.0, columns)
    _, want = torch.func.jvp(lambda z: R.loss_sqrt_hessian(z, torch.tensor([1]), "cross_entropy", "sum", -100, 0.0,
                                                           columns), (f64,), (t64[0],))
    torch.testing.assert_close(got[0], want)


def test_partition_follows_requires_grad_changes_with_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    fn = hogc.compile(model, "partition_grad", partition="module")
    fn(x, y)
    model[0].weight.requires_grad_(False)
    with pytest.raises(hogc.HogcError, match=r"\['0.weight'\] of the partition are no longer trainable"):
        fn(x, y)
    fn = hogc.compile(model, "partition_grad", partition="module")
    model[0].weight.requires_grad_(True)
    with pytest.raises(hogc.HogcError, match=r"\['0.weight'\] became trainable after compile"):
        fn(x, y)
    with pytest.raises(hogc.HogcError, match="must be a tensor"):
        hogc.compile(model, "partition_grad", direction={k: [0.0] for k, _ in model.named_parameters()})(x, y)
    with pytest.raises(hogc.HogcError, match="no trainable parameters"):
        hogc.compile(torch.nn.Sequential(torch.nn.Linear(3, 2).requires_grad_(False)), "partition_grad")
