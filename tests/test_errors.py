"""Bad input gets a hogc error that names the problem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hogc


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.cumsum(self.lin(x), dim=1)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.lin(x)
        return -self.lin(x)


def test_unsupported_op_names_op_module_line_and_supported_list():
    model = nn.Sequential(nn.Linear(3, 3), Cumsum())
    fn = hogc.compile(model, "grad")
    with pytest.raises(hogc.UnsupportedOpError) as e:
        fn(torch.randn(4, 3), torch.randint(0, 3, (4,)))
    msg = str(e.value)
    assert "cumsum" in msg and "module '1'" in msg and "test_errors.py" in msg and "torch.cumsum" in msg
    assert "linear" in msg and "tanh" in msg  # the supported list


def test_unknown_quantity_lists_valid_ones():
    with pytest.raises(hogc.UnknownQuantityError, match="unknown quantity 'ggn_diagonal'.*ggn_diag"):
        hogc.compile(nn.Linear(2, 2), "ggn_diagonal")


@pytest.mark.parametrize("loss,y,match", [
    (nn.CrossEntropyLoss(), torch.randint(0, 3, (5,)), r"target shape \(5,\).*\(4,\)"),
    (nn.CrossEntropyLoss(), torch.rand(4, 3), "class indices"),
    (nn.CrossEntropyLoss(), torch.tensor([0, 1, 2, 3]), r"must lie in \[0, 3\); got values in \[0, 3\]"),
    (nn.CrossEntropyLoss(), torch.tensor([0, 1, -1, 2]), r"must lie in \[0, 3\)"),
    (nn.CrossEntropyLoss(), torch.tensor([0, 1, 1, 2], dtype=torch.int32), r"torch.long.*y.long\(\)"),
    (nn.MSELoss(), torch.randn(4, 2), r"target shape \(4, 2\) != model output shape \(4, 3\)"),
    (nn.BCEWithLogitsLoss(), torch.ones(4, 3, dtype=torch.long), "floating point"),
])
def test_target_that_does_not_fit_the_loss(loss, y, match):
    fn = hogc.compile(nn.Linear(2, 3), "grad", loss=loss)
    with pytest.raises(hogc.TargetShapeError, match=match):
        fn(torch.randn(4, 2), y)


def test_data_dependent_control_flow():
    fn = hogc.compile(Branchy(), "grad")
    with pytest.raises(hogc.TraceError, match="data-dependent control flow"):
        fn(torch.randn(4, 3), torch.randint(0, 3, (4,)))


def test_integer_input():
    fn = hogc.compile(nn.Linear(3, 2), "grad")
    with pytest.raises(hogc.InputDtypeError, match="torch.int64"):
        fn(torch.ones(4, 3, dtype=torch.long), torch.randint(0, 2, (4,)))


def test_unsupported_loss():
    with pytest.raises(hogc.UnsupportedLossError, match="NLLLoss"):
        hogc.compile(nn.Linear(3, 2), "grad", loss=nn.NLLLoss())


def test_sample_mixing_is_an_error():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0)

    fn = hogc.compile(Mix(), "batch_grad")
    with pytest.raises(hogc.SampleMixingError, match="sum over the sample axis"):
        fn(torch.randn(4, 3), torch.randint(0, 2, (4,)))


def test_errors_share_one_base_class():
    for cls in (hogc.UnsupportedOpError, hogc.UnknownQuantityError, hogc.TargetShapeError, hogc.TraceError,
                hogc.InputDtypeError, hogc.VerificationError, hogc.UnsupportedLossError):
        assert issubclass(cls, hogc.HogcError)


def test_detach_of_parameter_dependent_value():
    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return h * h.detach()

    fn = hogc.compile(Det(), "grad")
    with pytest.raises(hogc.UnsupportedOpError, match="detach"):
        fn(torch.randn(4, 3), torch.randint(0, 2, (4,)))


def test_dtype_conversion_inside_the_model():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).double()

    fn = hogc.compile(Cast(), "grad")
    with pytest.raises(hogc.UnsupportedOpError, match="float32 -> torch.float64"):
        fn(torch.randn(4, 3), torch.randint(0, 2, (4,)))


def test_inplace_mutation_of_a_live_alias():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            flat = h.view(-1)
            h.mul_(2)  # flat sees this in eager mode; an SSA program would not
            return h + flat.view(h.shape)

    fn = hogc.compile(Alias(), "grad")
    with pytest.raises(hogc.UnsupportedOpError, match="in-place 'mul_'.*read afterwards through another view.*'view' -> 'view_1'"):
        fn(torch.randn(4, 3), torch.randint(0, 3, (4,)))


def test_constant_index_out_of_range():
    class OOR(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x)[:, torch.tensor([0, 5, 2])]

    fn = hogc.compile(OOR(), "grad")
    with pytest.raises(hogc.HogcError, match="out of bounds"):
        fn(torch.randn(4, 3), torch.randint(0, 3, (4,)))


def test_input_dtype_differs_from_parameters():
    fn = hogc.compile(nn.Linear(3, 2).double(), "grad")
    with pytest.raises(hogc.InputDtypeError, match="x has dtype torch.float32 but parameter 'weight'"):
        fn(torch.randn(4, 3), torch.randint(0, 2, (4,)))


def test_empty_batch():
    fn = hogc.compile(nn.Linear(3, 2), "grad")
    with pytest.raises(hogc.HogcError, match="at least one sample"):
        fn(torch.randn(0, 3), torch.randint(0, 2, (0,)))


def test_slice_assignment_gets_a_hint():
    class Assign(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            h[:, 1] = 0.0
            return h

    fn = hogc.compile(Assign(), "grad")
    with pytest.raises(hogc.UnsupportedOpError, match=r"assignment into part of a tensor"):
        fn(torch.randn(4, 3), torch.randint(0, 3, (4,)))


def test_ggnvp_needs_a_well_formed_vector():
    model = nn.Linear(3, 2)
    fn = hogc.compile(model, "ggnvp")
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(hogc.HogcError, match=r"needs a vector: call fn\(x, y, v\)"):
        fn(x, y)
    with pytest.raises(hogc.HogcError, match="no entry 'bias'"):
        fn(x, y, {"weight": torch.zeros(2, 3)})
    with pytest.raises(hogc.HogcError, match=r"v\['bias'\] has shape \(3,\)"):
        fn(x, y, {"weight": torch.zeros(2, 3), "bias": torch.zeros(3)})
    with pytest.raises(hogc.HogcError, match="unknown or frozen"):
        fn(x, y, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "scale": torch.zeros(1)})


def test_vector_given_to_a_quantity_without_one_and_wrong_dtype():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    v = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    with pytest.raises(hogc.HogcError, match="none of .* takes one"):
        hogc.compile(model, "ggn")(x, y, v)
    with pytest.raises(hogc.InputDtypeError, match=r"v\['weight'\] has dtype torch.float64"):
        hogc.compile(model, "hvp")(x, y, {"weight": torch.zeros(2, 3, dtype=torch.float64), "bias": torch.zeros(2)})
