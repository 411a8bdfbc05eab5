"""hogc/emit/contract.py: batched products that loop over views of an operand whose free letters
straddle its batch letters equal torch.einsum, and copy only the other operand."""
from __future__ import annotations

import pytest
import torch

from hogc.emit import contract
from hogc.emit.contract import batched_product, in_place_plan
from hogc.timing import peak_memory

# (equation, a's shape, b's shape, a view of b's storage, plan expected)
CASES = {
    # 3c3d's first convolution: columns (c, n, o, h, w) against windows of the input
    "columns x windows": ("cnohw,nikhlw->cnoikl", (9, 4, 16, 12, 12), (4, 3, 16, 16), "windows", True),
    # a sliced block of samples, the output with samples first
    "sliced block": ("cnohw,nikhlw->ncoikl", (9, 8, 16, 10, 10), (8, 5, 12, 12), "windows_sliced", True),
    # the larger operand second: roles swap
    "larger second": ("nikhlw,cnohw->nikloc", (4, 3, 12, 12), (9, 4, 16, 8, 8), "windows_first", True),
    # two loop letters outside the batch letter
    "two loop letters": ("cdnok,nkj->cdnoj", (3, 4, 6, 20, 32), (6, 32, 24), None, True),
    # batch letters outermost: einsum copies nothing, no loop
    "batch outermost": ("nok,nkj->noj", (32, 64, 128), (32, 128, 16), None, False),
}


def _operands(case):
    eq, sa, sb, view, _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    if view == "windows_first":
        x = torch.randn(sa, generator=g, dtype=torch.float64)
        a = x.unfold(2, 5, 1).unfold(3, 5, 1).permute(0, 1, 4, 2, 5, 3)
        return eq, a, torch.randn(sb, generator=g, dtype=torch.float64)
    a = torch.randn(sa, generator=g, dtype=torch.float64)
    if view is None:
        return eq, a, torch.randn(sb, generator=g, dtype=torch.float64)
    x = torch.randn(sb, generator=g, dtype=torch.float64)
    k = sb[2] - sa[3] + 1
    b = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 1, 4, 2, 5, 3)  # (n, i, kh, h, kw, w): no copy
    if view == "windows_sliced":
        a, b = a[:, 2:5], b[2:5]
    return eq, a, b


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    monkeypatch.setattr(contract, "MIN_ELEMENTS", 1000)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_product_equals_einsum(case):
    eq, a, b = _operands(case)
    assert (in_place_plan(eq, a, b) is not None) == CASES[case][4]
    got, want = batched_product(eq, a, b), torch.einsum(eq, a, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_batched_product_copies_only_the_smaller_operand():
    """einsum copies the straddling columns (as large as the product's inputs); the loop does not."""
    eq, a, b = _operands("columns x windows")
    a = a.float().repeat(1, 4, 4, 1, 1).contiguous()  # (9, 16, 64, 12, 12): 1.3M elements
    b = torch.randn(16, 3, 16, 16).unfold(2, 5, 1).unfold(3, 5, 1).permute(0, 1, 4, 2, 5, 3)
    out = torch.einsum(eq, a, b).numel() * 4
    loop, ein = peak_memory(lambda: batched_product(eq, a, b)), peak_memory(lambda: torch.einsum(eq, a, b))
    assert loop <= out + b.numel() * 4 * 1.05
    assert ein >= out + a.numel() * 4


def test_batched_product_under_autograd_and_small_operands_is_einsum(monkeypatch):
    eq, a, b = _operands("columns x windows")
    a.requires_grad_(True)
    batched_product(eq, a, b).square().sum().backward()  # out= records no graph: this one is einsum's
    want = torch.func.grad(lambda t: torch.einsum(eq, t, b).square().sum())(a.detach())
    torch.testing.assert_close(a.grad, want, rtol=1e-13, atol=1e-13)
    monkeypatch.setattr(contract, "MIN_ELEMENTS", 10**9)
    assert in_place_plan(eq, a, b) is None
