"""Partition-level derivatives (issue 5, orders 1 and 2 so far): equal to nested torch.func
references in float64 on the model registry, for several partitions and directions."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

import hogc

from .model_cases import CASES
from .reference import Reference
from .test_quantities import close

QS = ("partition_grad", "partition_hessian")


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


def test_partition_quadratic_model_of_the_loss():
    """L(theta + U eta) = L + g^T eta + eta^T H eta / 2 + O(|eta|^3): a finite-difference check."""
    model, lf, x, y = CASES[0].data()
    part = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    out = hogc.compile(model, QS, loss=lf, partition=part)(x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: lf(functional_call(model, p, (x,)), y))(params)
    eta = torch.tensor([0.3, -0.2], dtype=torch.float64)

    def at(h):
        p = dict(params)
        for j, sub in enumerate(part):
            for k in sub:
                p[k] = params[k] + h * eta[j] * g[k]
        return lf(functional_call(model, p, (x,)), y)

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
