"""Parametrized over the ATen lowering table: every lowered op, inside a model, against torch.func."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hogc
from hogc.capture.lower import IDENTITY, supported_ops
from hogc.capture.trace import trace_model

from .reference import Reference
from .test_quantities import assert_matches, close

N = 3
T = torch.tensor

# aten op name -> h, w -> output; h = Linear(4, 4)(x) of shape (N, 4), w a parameter of shape (4,)
CASES = {
    "linear": lambda h, w: F.linear(h, w.unsqueeze(0).expand(2, 4)),
    "matmul": lambda h, w: torch.cat([h @ w.unsqueeze(1), h.reshape(h.shape[0], 2, 2) @ w[:2],
                                      (h.reshape(h.shape[0], 2, 2) @ w.reshape(2, 2)).flatten(1)], 1),
    "mm": lambda h, w: torch.mm(h, w.unsqueeze(1) * w.unsqueeze(0)),
    "bmm": lambda h, w: torch.bmm(h.unsqueeze(2), w.expand(h.shape[0], 4).unsqueeze(1)).flatten(1),
    "addmm": lambda h, w: torch.addmm(w, h, w.unsqueeze(1).expand(4, 4)),
    "einsum": lambda h, w: torch.einsum("ni,i,j->nj", h, w, w),
    "add": lambda h, w: h + w + 1.5,
    "sub": lambda h, w: h - w - 0.5,
    "rsub": lambda h, w: 1.0 - h,
    "mul": lambda h, w: h * w * 2.0,
    "div": lambda h, w: h / (w**2 + 1.0) / 3.0,
    "neg": lambda h, w: -h,
    "pow": lambda h, w: (h**2 + 1) ** 1.5,
    "square": lambda h, w: torch.square(h),
    "exp": lambda h, w: torch.exp(h),
    "log": lambda h, w: torch.log(h**2 + 1),
    "sqrt": lambda h, w: torch.sqrt(h**2 + 1),
    "rsqrt": lambda h, w: torch.rsqrt(h**2 + 1),
    "reciprocal": lambda h, w: torch.reciprocal(h**2 + 1),
    "abs": lambda h, w: torch.abs(h),
    "sin": lambda h, w: torch.sin(h),
    "cos": lambda h, w: torch.cos(h),
    "relu": lambda h, w: torch.relu(h),
    "leaky_relu": lambda h, w: F.leaky_relu(h, 0.3),
    "elu": lambda h, w: F.elu(h, 1.2),
    "celu": lambda h, w: F.celu(h, 0.5),  # torch rounds 1/alpha through float32; 0.5 is exact
    "selu": lambda h, w: F.selu(h),
    "softplus": lambda h, w: F.softplus(h, beta=2.0, threshold=1.0),
    "sigmoid": lambda h, w: torch.sigmoid(h),
    "tanh": lambda h, w: torch.tanh(h),
    "silu": lambda h, w: F.silu(h),
    "gelu": lambda h, w: F.gelu(h) + F.gelu(h, approximate="tanh"),
    "log_sigmoid": lambda h, w: F.logsigmoid(h),
    "sum": lambda h, w: h.sum(1, keepdim=True) + h.sum(-1).unsqueeze(1),
    "mean": lambda h, w: h.mean(1, keepdim=True) * h,
    "view": lambda h, w: h.view(h.shape[0], 2, 2),
    "reshape": lambda h, w: h.reshape(h.shape[0], 2, 2),
    "flatten": lambda h, w: h.reshape(h.shape[0], 2, 2).flatten(1),
    "unflatten": lambda h, w: h.unflatten(1, (2, 2)),
    "squeeze": lambda h, w: h.unsqueeze(2).squeeze(2),
    "unsqueeze": lambda h, w: h.unsqueeze(1) * w.unsqueeze(1),
    "view_as": lambda h, w: (h * w).view_as(h),
    "reshape_as": lambda h, w: h.reshape(h.shape[0], 2, 2).reshape_as(h),
    "t": lambda h, w: (h.t() * w.unsqueeze(1)).t(),
    "transpose": lambda h, w: h.reshape(h.shape[0], 2, 2).transpose(1, 2),
    "permute": lambda h, w: h.reshape(h.shape[0], 2, 2).permute(0, 2, 1),
    "movedim": lambda h, w: h.reshape(h.shape[0], 2, 2).movedim(1, 2),
    "swapaxes": lambda h, w: h.reshape(h.shape[0], 2, 2).swapaxes(1, 2),
    "swapdims": lambda h, w: h.reshape(h.shape[0], 2, 2).swapdims(1, 2),
    "numpy_T": lambda h, w: h @ (w.unsqueeze(1) * w.unsqueeze(0) + torch.eye(4, dtype=h.dtype)[:, :1]).T,
    "mT": lambda h, w: (h.reshape(h.shape[0], 2, 2).mT * w[:2]).flatten(1),
    "flip": lambda h, w: h.flip(1) * w.flip(0),
    "clamp": lambda h, w: h.clamp(-0.3, 0.4) + h.clamp(min=0.1),
    "clip": lambda h, w: h.clip(max=0.2),
    "hardtanh": lambda h, w: torch.nn.functional.hardtanh(h, -0.5, 0.5),
    "addcmul": lambda h, w: torch.addcmul(h, h, w, value=0.5),
    "type_as": lambda h, w: h.type_as(w),
    "expand": lambda h, w: w.expand(h.shape[0], 4) * h,
    "expand_as": lambda h, w: w.expand_as(h) * h,
    "slice": lambda h, w: h[:, 1:4:2],
    "narrow": lambda h, w: h.narrow(1, 1, 2),
    "select": lambda h, w: h.reshape(h.shape[0], 2, 2)[:, 1],
    "index": lambda h, w: h[:, T([3, 0, 3])],
    "index_select": lambda h, w: h.index_select(1, T([2, 0, 2])),
    "gather": lambda h, w: torch.gather(h.view(-1, 2, 2), 2, T([[[1, 0]]]).expand(h.shape[0], 1, 2)).flatten(1) * w[:2],
    "cat": lambda h, w: torch.cat([h, h[:, :1]], 1),
    "concat": lambda h, w: torch.concat([h, w.expand(h.shape[0], 4)], 1),
    "concatenate": lambda h, w: torch.concatenate([h, h], 1),
    "stack": lambda h, w: torch.stack([h, h * 2], 1),
    "split": lambda h, w: torch.split(h, 2, 1)[1],
    "split_with_sizes": lambda h, w: torch.split(h, [1, 3], 1)[1],
    "chunk": lambda h, w: h.chunk(2, 1)[0] * h.chunk(2, 1)[1],
    "unbind": lambda h, w: h.unbind(1)[2].unsqueeze(1),
    "dropout": lambda h, w: F.dropout(h, 0.5, training=False),
    "to": lambda h, w: h.to(torch.float64),
    "ones": lambda h, w: h + torch.ones(4, dtype=h.dtype),
    "zeros": lambda h, w: h + torch.zeros(4, dtype=h.dtype),
    "full": lambda h, w: h * torch.full((4,), 2.0, dtype=h.dtype),
    "arange": lambda h, w: h * torch.arange(4, dtype=h.dtype),
    "eye": lambda h, w: h @ torch.eye(4, dtype=h.dtype),
    "tensor": lambda h, w: h * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=h.dtype),
    "ones_like": lambda h, w: h * torch.ones_like(w),
    "zeros_like": lambda h, w: h + torch.zeros_like(h),
    "full_like": lambda h, w: h * torch.full_like(w, 3.0),
    "clone": lambda h, w: h.clone(),
    # layers (hogc/capture/nn_ops.py); h is (N, 4), w (4,)
    "conv1d": lambda h, w: F.conv1d(h.view(-1, 1, 4), w[:3].view(1, 1, 3), w[3:], padding=1).flatten(1),
    "conv2d": lambda h, w: F.conv2d(h.view(-1, 1, 2, 2), w.view(2, 1, 1, 2).expand(2, 1, 2, 2).contiguous(),
                                    stride=1, padding=(1, 0), dilation=1).flatten(1),
    "conv3d": lambda h, w: F.conv3d(h.view(-1, 4, 1, 1, 1), w.view(1, 4, 1, 1, 1), w[:1], padding=1).flatten(1),
    "conv_transpose1d": lambda h, w: F.conv_transpose1d(h.view(-1, 2, 2), w.view(2, 1, 2), stride=2).flatten(1),
    "conv_transpose2d": lambda h, w: F.conv_transpose2d(h.view(-1, 1, 2, 2), w.view(1, 1, 2, 2), stride=1,
                                                        padding=1, output_padding=0).flatten(1),
    "conv_transpose3d": lambda h, w: F.conv_transpose3d(h.view(-1, 1, 1, 2, 2), w.view(1, 1, 1, 2, 2)).flatten(1),
    "avg_pool1d": lambda h, w: F.avg_pool1d(h.view(-1, 1, 4) * w, 3, 1, padding=1, count_include_pad=False).flatten(1),
    "avg_pool2d": lambda h, w: F.avg_pool2d(h.view(-1, 1, 2, 2) * w.view(2, 2), 2, 1, padding=1,
                                            ceil_mode=True).flatten(1),
    "avg_pool3d": lambda h, w: F.avg_pool3d(h.view(-1, 1, 1, 2, 2), (1, 2, 1)).flatten(1),
    "adaptive_avg_pool1d": lambda h, w: F.adaptive_avg_pool1d(h.view(-1, 1, 4) * w, 3).flatten(1),
    "adaptive_avg_pool2d": lambda h, w: F.adaptive_avg_pool2d(h.view(-1, 1, 2, 2), (3, 1)).flatten(1),
    "adaptive_avg_pool3d": lambda h, w: F.adaptive_avg_pool3d(h.view(-1, 1, 1, 2, 2), 1).flatten(1),
    "max_pool1d": lambda h, w: F.max_pool1d(h.view(-1, 1, 4) * w, 2, 1, padding=1).flatten(1),
    "max_pool2d": lambda h, w: F.max_pool2d(h.view(-1, 1, 2, 2), 2, 1, padding=1, ceil_mode=True).flatten(1),
    "max_pool3d": lambda h, w: F.max_pool3d(h.view(-1, 1, 1, 2, 2), (1, 2, 1)).flatten(1),
    "layer_norm": lambda h, w: F.layer_norm(h, (4,), w, w * 0.5),
    "group_norm": lambda h, w: F.group_norm(h.view(-1, 4, 1), 2, w, w),
    "rms_norm": lambda h, w: F.rms_norm(h, (4,), w, eps=1e-3),
    "batch_norm": lambda h, w: F.batch_norm(h, torch.linspace(-1, 1, 4, dtype=h.dtype),
                                            torch.linspace(0.5, 2, 4, dtype=h.dtype), w, w, training=False),
    "var": lambda h, w: h.var(1, keepdim=True) + h.var(1, correction=0, keepdim=True) * w,
    "std": lambda h, w: h.std(1, keepdim=True) * w,
    "softmax": lambda h, w: torch.softmax(h * w, 1),
    "log_softmax": lambda h, w: torch.log_softmax(h * w * 10, 1),
    "scaled_dot_product_attention": lambda h, w: F.scaled_dot_product_attention(
        h.view(-1, 2, 2), (h * w).view(-1, 2, 2), h.view(-1, 2, 2), is_causal=True).flatten(1),
    "linspace": lambda h, w: h * torch.linspace(0.5, 2.0, 4, dtype=h.dtype),
    "embedding": lambda h, w: h * F.embedding(T([1, 0, 3, 2]), w.unsqueeze(1)).squeeze(1),
    "pad": lambda h, w: F.pad(h * w, (1, -1)) + F.pad(h, (2, 0), value=0.7)[:, :4],  # 0.7: not a float32 number
}


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4) * 0.5 + 1.0)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x), self.w)


def _captured_ops(model, x) -> set[str]:
    gm = trace_model(model, x)
    return {getattr(n.target, "__name__", "").split(".")[0] for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowering_against_torch_func(name):
    torch.manual_seed(0)
    model = Wrap(CASES[name]).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    assert name in _captured_ops(model, x) or name in CAPTURED_AS, f"case for '{name}' does not produce it"
    with torch.no_grad():
        y = torch.randn(model(x).shape, dtype=torch.float64)
    lf = nn.MSELoss(reduction="sum")
    out = hogc.compile(model, ("grad", "batch_grad", "ggn_diag"), loss=lf)(x, y)
    ref = Reference(model, lf, x, y)
    assert_matches(out, ref, ("grad", "batch_grad", "ggn_diag"))


CAPTURED_AS = {"to", "tensor", "type_as"}  # `to` of the same dtype vanishes; torch.tensor(...) becomes a constant
UNREACHABLE = {  # lowerings for ATen ops that pre-dispatch tracing does not emit for these calls
    "convolution", "_softmax", "_log_softmax", "constant_pad_nd",  # lower-level spellings of covered ops
    "_unsafe_view", "_to_copy",  # _to_copy only for real dtype changes, which raise (test_errors)
    "detach",  # detach of a parameter-dependent value is an error (test_errors)
}


def test_every_lowering_has_a_case():
    missing = sorted(set(supported_ops()) - set(CASES) - UNREACHABLE - IDENTITY)
    assert not missing, f"lowerings without a test case in tests/test_lowerings.py: {missing}"


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.a(x))
        h = torch.cat([self.b(h), h[:, :1]], 1)
        h += 1.0
        h.mul_(torch.sigmoid(h[:, :1].clone()))
        return torch.tanh_(h)


def test_inplace_ops_lower_to_their_functional_twins():
    torch.manual_seed(0)
    model = InPlace().double()
    x = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (N,))
    out = hogc.compile(model, ("grad", "batch_grad", "ggn_diag"))(x, y)
    ref = Reference(model, nn.CrossEntropyLoss(), x, y)
    assert_matches(out, ref, ("grad", "batch_grad", "ggn_diag"))


def test_inplace_variant_of_a_name_read_rule():
    """t_ must lower like t (rules see the ATen name with the in-place underscore removed)."""
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).t_().t()

    torch.manual_seed(0)
    model = T().double()
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.randint(0, 3, (N,))
    got = hogc.compile(model, "grad")(x, y)
    want = Reference(model, nn.CrossEntropyLoss(), x, y).grad()
    for k in want:
        close(got[k], want[k])


class RuntimeIndices(nn.Module):
    """Indices held in buffers (and, with integer inputs, the inputs themselves): one GATHER each,
    whose reverse mode is a scatter-add."""

    def __init__(self, integer_x: bool):
        super().__init__()
        self.integer_x = integer_x
        self.table = nn.Parameter(torch.randn(5, 4))
        self.lin = nn.Linear(4, 4)
        self.register_buffer("pick", T([3, 0, 3, 1]))
        self.register_buffer("ids", T([[4, 0, 4], [1, 2, 1]]))
        self.register_buffer("cols", T([[2, 2, 0, 1]]))

    def forward(self, x):
        if self.integer_x:  # token ids: table[x] is an embedding lookup by gather
            h = self.lin(self.table[x].sum(1))
        else:
            h = self.lin(x)
        a = h[:, self.pick] * h.index_select(1, self.pick[:2]).sum(1, keepdim=True)
        b = torch.einsum("ni,kti->nk", h, self.table[self.ids])  # a parameter gathered by a 2-d index
        c = torch.gather(torch.tanh(h), 1, self.cols.expand(h.shape[0], 4))
        return torch.cat([a, b, c], 1)


@pytest.mark.parametrize("integer_x", [False, True], ids=["float_x", "integer_x"])
def test_runtime_index_tensors(integer_x):
    torch.manual_seed(0)
    model = RuntimeIndices(integer_x).double()
    x = torch.randint(0, 5, (N, 3)) if integer_x else torch.randn(N, 4, dtype=torch.float64)
    assert {"gather", "index", "index_select"} <= _captured_ops(model, x)
    with torch.no_grad():
        y = torch.randn(model(x).shape, dtype=torch.float64)
    lf = nn.MSELoss()
    qs = ("grad", "batch_grad", "ggn_diag", "hessian_diag")
    fn = hogc.compile(model, qs, loss=lf)
    out = fn(x, y)
    assert_matches(out, Reference(model, lf, x, y), qs)
    assert "gather" in fn.code and "scatter_add" in fn.code


class _Negative(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 4))
        self.lin = nn.Linear(4, 6)
        self.register_buffer("idx", T([-1, 0, 2]))

    def forward(self, ids):  # one id per sample (negative ones count from the end), a negative buffer index
        return torch.tanh(self.lin(torch.tanh(self.table[ids])))[:, self.idx]


def test_runtime_indices_negative_and_one_per_sample():
    torch.manual_seed(0)
    model = _Negative().double()
    x, y = T([-1, 2, -7, 3]), torch.randint(0, 3, (4,))
    qs = ("grad", "batch_grad", "ggn_diag", "hessian_diag")
    lf = nn.CrossEntropyLoss()
    assert_matches(hogc.compile(model, qs, loss=lf)(x, y), Reference(model, lf, x, y), qs)


def test_runtime_boolean_mask_is_a_clear_error():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.register_buffer("keep", T([True, False, True, True, False, False]))

        def forward(self, x):
            return self.lin(x)[:, self.keep]

    with pytest.raises(hogc.UnsupportedOpError, match="boolean mask"):
        hogc.compile(Masked(), "grad")(torch.randn(3, 4), torch.randint(0, 3, (3,)))
