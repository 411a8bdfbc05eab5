"""On a CUDA device (skipped without one): every quantity equals the CPU result, and a memory
budget is met as measured by ``torch.cuda.max_memory_allocated``."""
from __future__ import annotations

import pytest
import torch

import hogc
from hogc.timing import peak_memory

from .model_cases import CASES
from .test_quantities import GENERAL, close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(tree, device):
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    return {k: _to(v, device) for k, v in tree.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_equals_cpu(case):
    model, lf, x, y = case.data()
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    qs = GENERAL  # with seed=, the Monte-Carlo draws are the same numbers on both devices
    cpu = hogc.compile(model, qs, loss=lf, top_k=2, seed=5)(x, y, v)
    model.cuda()
    got = hogc.compile(model, qs, loss=lf, top_k=2, seed=5)(x.cuda(), y.cuda(), _to(v, "cuda"))
    for q in qs:
        if isinstance(cpu[q], dict):
            for k in cpu[q]:
                assert got[q][k].is_cuda
                close(got[q][k].cpu(), cpu[q][k])
        else:
            close(got[q].cpu(), cpu[q])


def test_cuda_memory_budget_is_met():
    from hogc.examples import PROBLEMS

    model, x, y, lf = PROBLEMS["sequence_mlp"](64)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    fn = hogc.compile(model, "sum_grad_squared", lf)
    ref = fn(x, y)
    unsliced = peak_memory(lambda: fn(x, y), "cuda")
    budget = unsliced // 4
    fb = hogc.compile(model, "sum_grad_squared", lf, memory_budget=budget)
    got = fb(x, y)
    assert peak_memory(lambda: fb(x, y), "cuda") <= budget
    for k in ref:
        close(got[k], ref[k], rel=1e-5)


@pytest.mark.parametrize("zoo", __import__("tests.test_zoo", fromlist=["ZOO"]).ZOO, ids=lambda z: z.id)
def test_cuda_inductor_equals_eager_on_the_zoo(zoo):
    """backend='auto' is Inductor (Triton kernels) on CUDA; float32 against the eager program."""
    model, lf, x, y = zoo.data()
    model = model.float().cuda()
    x = (x.float() if x.is_floating_point() else x).cuda()
    y = y.cuda()
    qs = ("grad", "batch_l2", "ggn_diag", "hvp")
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g).cuda() for k, p in model.named_parameters()}
    want = hogc.compile(model, qs, loss=lf)(x, y, v)
    fn = hogc.compile(model, qs, loss=lf, backend="auto")
    got = fn(x, y, v)
    assert fn.explain().strategies["backend"].startswith("inductor")
    for q in qs:
        for k in want[q]:
            scale = max(float(want[q][k].abs().max()), 1e-12)
            assert float((got[q][k] - want[q][k]).abs().max()) <= 1e-4 * scale, (q, k)
