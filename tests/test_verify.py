"""The verifier rejects ill-formed programs with a message naming the node."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hogc
from hogc.ir import Index, Node, Op, Program, Variance, build as B, verify
from hogc.ir.node import Einsum


def idx(name, size, space, v):
    return Index(name, size, space, v)


def test_contracting_two_lower_indices_is_rejected():
    g1 = B.inp("data", "g1", (idx("o", 4, "h1", Variance.LOW),))
    g2 = B.inp("data", "g2", (idx("o", 4, "h1", Variance.LOW),))
    bad = B.einsum(["a", "a"], "", [g1, g2])
    with pytest.raises(hogc.VerificationError, match=r"(?s)%2 = einsum.*contracts two lower indices"):
        verify(Program.of({"bad": bad}))


def test_contraction_with_explicit_metric_is_accepted():
    g = B.inp("data", "g", (idx("o", 4, "h1", Variance.LOW),))
    verify(Program.of({"norm": B.einsum(["a", "a"], "", [g, g], metric="a")}))


def test_upper_lower_pair_is_accepted():
    x = B.inp("data", "x", (idx("i", 3, "h0", Variance.UP),))
    w = B.inp("param", "w", (idx("o", 2, "h1", Variance.UP), idx("i", 3, "h0", Variance.LOW)))
    verify(Program.of({"y": B.einsum(["b", "ab"], "a", [x, w])}))


def test_mismatched_sizes_are_rejected():
    x = B.inp("data", "x", (idx("i", 3, "h0", Variance.UP),))
    w = B.inp("param", "w", (idx("o", 2, "h1", Variance.UP), idx("i", 4, "h0", Variance.LOW)))
    bad = Node(Op.EINSUM, (x, w), Einsum(("b", "ab"), "a"), (idx("o", 2, "h1", Variance.UP),))
    with pytest.raises(hogc.VerificationError, match=r"(?s)%2 = einsum.*letter 'b' has sizes 3 and 4"):
        verify(Program.of({"y": bad}))


def test_adding_a_covector_to_a_vector_is_rejected():
    x = B.inp("data", "x", (idx("i", 3, "h0", Variance.UP),))
    g = B.inp("data", "g", (idx("i", 3, "h0", Variance.LOW),))
    with pytest.raises(hogc.VerificationError, match=r"(?s)%2 = add.*different variance"):
        verify(Program.of({"s": B.add(x, g)}))


def test_broadcast_size_mismatch_is_rejected():
    x = B.inp("data", "x", (idx("i", 3, "h0", Variance.UP),))
    z = B.inp("data", "z", (idx("i", 4, "h0", Variance.UP),))
    bad = Node(Op.ADD, (x, z), None, (idx("i", 4, "h0", Variance.UP),))
    with pytest.raises(hogc.VerificationError, match=r"(?s)add.*size mismatch"):
        verify(Program.of({"s": bad}))


def test_schedule_out_of_topological_order_is_rejected():
    x = B.inp("data", "x", (idx("i", 3, "h0", Variance.UP),))
    y = B.elementwise("tanh", 0, (), x)
    with pytest.raises(hogc.VerificationError, match="not scheduled before its use"):
        verify(Program({"y": y}, (y, x)))


def test_captured_programs_pair_variances():
    """Parameters get mixed variance W^o_i; gradients are lower-upper G_o^i."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    fn = hogc.compile(model, "grad", verify=True)
    fn(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    text = fn.ir
    assert "input[param '0.weight']" in text
    line = next(ln for ln in text.splitlines() if "input[param '0.weight']" in ln)
    assert "^4" in line and "_3" in line  # W^o_i: output upper, input lower


class _AddCovector(nn.Module):
    """P is contracted with x (so its input axis is lower) and also added to a vector."""

    def __init__(self):
        super().__init__()
        self.P = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.P.t() @ self.P + x


class _TripleLetter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.einsum("ni,i,i->n", x, self.w, self.w).unsqueeze(1) * self.lin(x)


class _OrderA(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return (x @ self.p) * self.lin(x + self.p[0])


class _OrderB(_OrderA):
    def forward(self, x):
        return self.lin(x + self.p[0]) * (x @ self.p)


@pytest.mark.parametrize("cls", [_AddCovector, _TripleLetter, _OrderA, _OrderB], ids=lambda c: c.__name__)
def test_euclidean_identifications_are_explicit(cls):
    """Models that identify vectors and covectors verify, whatever the operand order: the capture
    records the Euclidean metric it needs instead of leaving variances half-assigned."""
    fn = hogc.compile(cls(), ("grad", "ggn_diag"), loss=nn.MSELoss(), verify=True)
    fn(torch.randn(5, 4), torch.randn(5, 4))
    if cls in (_AddCovector, _TripleLetter):
        assert "metric" in fn.ir


def test_index_preserving_op_that_flips_a_variance_is_rejected():
    x = B.inp("data", "x", (idx("i", 3, "h0", Variance.UP), idx("j", 2, "h1", Variance.UP)))
    bad = Node(Op.PERMUTE, (x,), (1, 0), (idx("j", 2, "h1", Variance.UP), idx("i", 3, "h0", Variance.LOW)))
    with pytest.raises(hogc.VerificationError, match=r"(?s)%1 = permute.*only a metric may change a variance"):
        verify(Program.of({"p": bad}))
