"""Kronecker factors (KFLR exact, KFAC Monte-Carlo) against BackPACK and against the GGN block."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hogc

from .model_cases import CASES
from .test_quantities import close

from backpack import backpack as bp_ctx, extend  # test dependency, installed --no-deps by `make test`
from backpack import extensions as ext

SEQUENTIAL = [c for c in CASES if c.sequential]
BACKPACK_KFLR = [c for c in SEQUENTIAL if "elu" not in c.id]  # BackPACK's KFLR has no ELU rule
# layers on 2-d inputs (a weight shared over positions is exact only in special cases: tested below)
WITH_LINEAR = [c for c in CASES if not c.id.startswith("einsum_net") and len(c.x_shape) == 2]


def _assert_kflr_matches_backpack(model, lf, x, y) -> None:
    out = hogc.compile(model, "kflr", loss=lf)(x, y)
    model, lf = extend(model), extend(lf)
    with bp_ctx(ext.KFLR()):
        lf(model(x), y).backward()
    for name, p in model.named_parameters():
        assert len(out[name]) == len(p.kflr)
        for got, want in zip(out[name], p.kflr):
            close(got, want)


@pytest.mark.parametrize("case", BACKPACK_KFLR, ids=lambda c: c.id)
def test_kflr_matches_backpack(case):
    _assert_kflr_matches_backpack(*case.data())


@pytest.mark.parametrize("case", WITH_LINEAR, ids=lambda c: c.id)
def test_kflr_is_the_ggn_block_at_batch_size_one(case):
    """For one sample, B (x) A is exactly the GGN block of a linear layer's weight, B that of its bias."""
    one = type(case)(case.id, case.make, case.loss, (1,) + case.x_shape[1:])
    model, lf, x, y = one.data()
    out = hogc.compile(model, ("kflr", "ggn_block"), loss=lf)(x, y)
    assert out["kflr"], "no Kronecker factors found"
    for name, factors in out["kflr"].items():
        want = out["ggn_block"][name]
        got = torch.kron(factors[0], factors[1]) if len(factors) == 2 else factors[0]
        close(got, want)


def test_factor_variances_in_the_ir():
    """Output factor lower-lower, input factor upper-upper, so B^-1 G A^-1 has W's variance."""
    model = nn.Sequential(nn.Linear(4, 3))
    fn = hogc.compile(model, "kflr")
    fn(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    lines = fn.ir.splitlines()
    ret = lines[-1]
    b_ref = ret.split("kflr/0.weight/0=")[1].split(",")[0].strip(" }")
    a_ref = ret.split("kflr/0.weight/1=")[1].split(",")[0].strip(" }")
    line = {ln.split("=")[0].strip(): ln for ln in lines[:-1]}
    assert line[b_ref].rstrip().endswith("(h1_3 h1_3)")
    assert line[a_ref].rstrip().endswith("(h0^4 h0^4)")


def test_kfac_is_kflr_in_expectation():
    """Statistical check: with M = 20000 Monte-Carlo columns every factor is within 5% (relative
    Frobenius error) of KFLR; the error shrinks like 1/sqrt(M), about 1% here."""
    case = SEQUENTIAL[0]
    model, lf, x, y = case.data()
    exact = hogc.compile(model, "kflr", loss=lf)(x, y)
    mc = hogc.compile(model, "kfac", loss=lf, mc_samples=20000, seed=0)(x, y)
    for name in exact:
        for got, want in zip(mc[name], exact[name]):
            assert (got - want).norm() / want.norm() < 0.05


def test_kfac_matches_backpack_in_expectation():
    """Both draw 5000 Monte-Carlo samples: each output factor is within 8% of the other's (both carry
    ~1.5% sampling error); input factors are deterministic and equal."""
    case = SEQUENTIAL[0]
    model, lf, x, y = case.data()
    ours = hogc.compile(model, "kfac", loss=lf, mc_samples=5000, seed=1)(x, y)
    model, lf = extend(model), extend(lf)
    torch.manual_seed(2)
    with bp_ctx(ext.KFAC(mc_samples=5000)):
        lf(model(x), y).backward()
    for name, p in model.named_parameters():
        assert (ours[name][0] - p.kfac[0]).norm() / p.kfac[0].norm() < 0.08
        if len(p.kfac) == 2:
            close(ours[name][1], p.kfac[1])


def test_no_linear_map_is_a_clear_error():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    fn = hogc.compile(Scale(), "kflr")
    with pytest.raises(hogc.UnsupportedOpError, match="no parameter is used exactly once as the weight of a linear map"):
        fn(torch.randn(4, 3), torch.randint(0, 3, (4,)))


class _Tied(nn.Module):
    """One weight in two linear maps of the same input; only one has a bias, so W x has two uses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x) + torch.tanh(self.b(x))


class _HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(5, 4) * 0.5)
        self.b = nn.Parameter(torch.randn(5) * 0.1)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.W.T + self.b))


@pytest.mark.parametrize("make", [_Tied, _HandWritten] + [c.make for c in WITH_LINEAR],
                         ids=["tied", "hand_written"] + [c.id for c in WITH_LINEAR])
def test_bias_factor_is_the_exact_bias_block(make):
    """A bias's Jacobian is the identity, so its factor B is its exact GGN block at any batch size."""
    torch.manual_seed(0)
    model = make().double()
    x_shape = (5, 4) if make in (_Tied, _HandWritten) else next(c for c in WITH_LINEAR if c.make is make).x_shape
    case = next((c for c in WITH_LINEAR if c.make is make), None)
    if case is not None:
        model, lf, x, y = case.data()
    else:
        lf, x, y = nn.CrossEntropyLoss(), torch.randn(x_shape, dtype=torch.float64), torch.randint(0, 3, (5,))
    out = hogc.compile(model, ("kflr", "ggn_block"), loss=lf)(x, y)
    biases = [k for k, f in out["kflr"].items() if len(f) == 1]
    assert biases
    for k in biases:
        close(out["kflr"][k][0], out["ggn_block"][k])
    if make is _HandWritten:
        assert set(out["kflr"]) >= {"W", "b"}


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU], ids=lambda a: a.__name__)
def test_kfra_matches_backpack(act):
    """BackPACK's KFRA (cross-entropy; its MSE sum-Hessian path fails on float64 in BackPACK 1.7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 6), act(), nn.Linear(6, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    out = hogc.compile(model, "kfra")(x, y)
    model, lf = extend(model), extend(nn.CrossEntropyLoss())
    with bp_ctx(ext.KFRA()):
        lf(model(x), y).backward()
    for name, p in model.named_parameters():
        assert len(out[name]) == len(p.kfra)
        for got, want in zip(out[name], p.kfra):
            close(got, want)


@pytest.mark.parametrize("case", SEQUENTIAL, ids=lambda c: c.id)
def test_kfra_is_kflr_at_batch_size_one(case):
    """With one sample the batch averages are exact, so KFRA's recursion gives KFLR's factors."""
    one = type(case)(case.id, case.make, case.loss, (1,) + case.x_shape[1:])
    model, lf, x, y = one.data()
    out = hogc.compile(model, ("kfra", "kflr"), loss=lf)(x, y)
    assert set(out["kfra"]) == set(out["kflr"])
    for name in out["kflr"]:
        for got, want in zip(out["kfra"][name], out["kflr"][name]):
            close(got, want)


CONV_MODELS = {
    "conv2d_maxpool": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.MaxPool2d(2),
                                             nn.Flatten(), nn.Linear(12, 4)), (5, 2, 8, 8)),
    "c3d3": (lambda: __import__("hogc.zoo", fromlist=["c3d3"]).c3d3(3, (3, 4, 4), (6, 5), 4, size=16), (3, 3, 16, 16)),
    "conv1d_dilated": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2), nn.Tanh(), nn.Flatten(),
                                             nn.Linear(12, 4)), (4, 2, 8)),
    "conv_1x1_and_3x1": (lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.Tanh(), nn.Conv2d(3, 3, (3, 1)), nn.Flatten(),
                                               nn.Linear(24, 4)), (3, 2, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(CONV_MODELS))
def test_conv_kflr_matches_backpack(name):
    """Convolutions: B from the position-summed square-root columns, A from the unfolded input
    (BackPACK's convention for KFLR on convolutions)."""
    make, shape = CONV_MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(shape, dtype=torch.float64), torch.randint(0, 4, (shape[0],))
    _assert_kflr_matches_backpack(model, nn.CrossEntropyLoss(), x, y)


# --- weights shared over positions: expand and reduce (Eschenhagen et al. 2023) ---------------

class _Sequence(nn.Module):
    """Two linear layers applied at every position of a sequence, a per-token loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):  # (N, T, 3) -> (N, 3, T)
        return self.b(torch.tanh(self.a(x))).transpose(1, 2)


def _layer_ggn(model, lf, x, y, layer):
    """G_z = J^T (d2L/df2) J with J the Jacobian of the model output w.r.t. the layer's output z
    (torch.func, float64): shape z.shape + z.shape. Also returns the layer's input."""
    from torch.func import hessian, jacrev

    store = {}

    def run(delta):
        def hook(m, inp, out):
            store["x"] = inp[0].detach()
            return out + delta
        h = layer.register_forward_hook(hook)
        try:
            return model(x)
        finally:
            h.remove()

    zero = torch.zeros(_layer_out_shape(model, x, layer), dtype=x.dtype if x.is_floating_point() else torch.float64)
    f = run(zero).detach()
    J = jacrev(run)(zero).reshape(f.numel(), zero.numel())
    H = hessian(lambda v: lf(v.reshape(f.shape), y))(f.flatten())
    G = (J.T @ H @ J).reshape(zero.shape + zero.shape)
    return G, store["x"]


def _layer_out_shape(model, x, layer):
    shape = {}

    def hook(m, i, o):
        shape["s"] = tuple(o.shape)

    h = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    return shape["s"]


def _linear_factors(G, x, approx):
    """Reference factors of a linear layer on (N, T, I) inputs from the layer GGN (N,T,O,N,T,O)."""
    N, T = x.shape[:2]
    if approx == "expand":
        Bf = torch.einsum("ntonTp->op", G * torch.eye(T, dtype=G.dtype)[None, :, None, None, :, None]
                          * torch.eye(N, dtype=G.dtype)[:, None, None, :, None, None])
        return Bf, torch.einsum("nti,ntj->ij", x, x) / (N * T)
    Bf = torch.einsum("ntomsp->op", G * torch.eye(N, dtype=G.dtype)[:, None, None, :, None, None])
    xm = x.mean(1)
    return Bf, xm.T @ xm / N


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_factors_match_their_definition(approx):
    torch.manual_seed(0)
    model = _Sequence().double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 4))
    lf = nn.CrossEntropyLoss()
    got = hogc.compile(model, "kflr", loss=lf, kfac_approx=approx)(x, y)
    default = hogc.compile(model, "kflr", loss=lf)(x, y)
    for name, layer in (("a", model.a), ("b", model.b)):
        G, xin = _layer_ggn(model, lf, x, y, layer)
        Bw, Aw = _linear_factors(G, xin, approx)
        close(got[f"{name}.weight"][0], Bw)
        close(got[f"{name}.weight"][1], Aw)
        close(got[f"{name}.bias"][0], Bw)
        if approx == "expand":  # the default for weights shared over a sequence
            close(default[f"{name}.weight"][1], Aw)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_convolution_factors_kfc_and_kfac_reduce(approx):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    lf = nn.CrossEntropyLoss()
    got = hogc.compile(model, "kflr", loss=lf, kfac_approx=approx)(x, y)
    G, xin = _layer_ggn(model, lf, x, y, model[0])
    N, Co = G.shape[:2]
    P = G.shape[2] * G.shape[3]
    G = G.reshape(N, Co, P, N, Co, P)
    U = F.unfold(xin, 3, padding=1, stride=2)  # (N, C_in * 9, P)
    eyeN = torch.eye(N, dtype=G.dtype)[:, None, None, :, None, None]
    if approx == "expand":
        Bw = torch.einsum("nopmqr->oq", G * eyeN * torch.eye(P, dtype=G.dtype)[None, None, :, None, None, :])
        Aw = torch.einsum("nip,njp->ij", U, U) / (N * P)
    else:
        Bw = torch.einsum("nopmqr->oq", G * eyeN)
        Um = U.mean(2)
        Aw = Um.T @ Um / N
    close(got["0.weight"][0], Bw)
    close(got["0.weight"][1], Aw)
    close(got["0.bias"][0], Bw)
    # the 2-d linear head: every approximation is the same
    base = hogc.compile(model, "kflr", loss=lf)(x, y)
    for f1, f2 in zip(got["3.weight"], base["3.weight"]):
        close(f1, f2)


def test_kfac_approx_is_checked():
    with pytest.raises(hogc.HogcError, match="unknown kfac_approx 'mean'"):
        hogc.compile(nn.Linear(2, 2), "kflr", kfac_approx="mean")
    with pytest.raises(hogc.HogcError, match="only applies to the kflr and kfac"):
        hogc.compile(nn.Linear(2, 2), "ggn_diag", kfac_approx="reduce")


def kronecker_reference(model, lf, x, y, name, approx):
    """(B, A) of the layer owning parameter ``name`` from the layer-output GGN (torch.func):
    linear layers over positions (expand unless ``approx='reduce'``) and one-group convolutions
    (BackPACK's convention unless ``approx`` is given: KFC = expand, KFAC-reduce)."""
    import torch.nn.functional as F

    layer = model.get_submodule(name.rpartition(".")[0])
    G, xin = _layer_ggn(model, lf, x, y, layer)
    N = G.shape[0]
    eyeN = torch.eye(N, dtype=G.dtype)
    if isinstance(layer, nn.Linear):
        O, I = layer.out_features, layer.in_features
        T = math.prod(G.shape[1:G.ndim // 2 - 1])
        return _linear_factors(G.reshape(N, T, O, N, T, O), xin.reshape(N, T, I), approx or "expand")
    Co = layer.out_channels
    P = math.prod(G.shape[2:G.ndim // 2])
    G = G.reshape(N, Co, P, N, Co, P) * eyeN[:, None, None, :, None, None]
    U = F.unfold(xin, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    if approx == "expand":
        Bf = torch.einsum("nopmqr->oq", G * torch.eye(P, dtype=G.dtype)[None, None, :, None, None, :])
        return Bf, torch.einsum("nip,njp->ij", U, U) / (N * P)
    Bf = torch.einsum("nopmqr->oq", G)
    if approx == "reduce":
        Um = U.mean(2)
        return Bf, Um.T @ Um / N
    return Bf, torch.einsum("nip,njp->ij", U, U) / N


@pytest.mark.parametrize("approx", [None, "reduce"])
@pytest.mark.parametrize("zoo", __import__("tests.test_zoo", fromlist=["ZOO"]).ZOO, ids=lambda z: z.id)
def test_zoo_kronecker_factors_match_their_definition(zoo, approx):
    """kflr on every zoo model: each factored layer (convolutions, linear layers, the
    transformer's layers over its sequence) against the layer-output GGN."""
    from hogc.zoo import TinyGPT

    model, lf, x, y = zoo.data()
    got = hogc.compile(model, "kflr", loss=lf, kfac_approx=approx)(x, y)
    if isinstance(model, TinyGPT):
        model.set_fused(False)
    weights = [k for k in got if k.endswith(".weight")]
    assert weights, "no factored layer"
    for name in weights:
        Bw, Aw = kronecker_reference(model, lf, x, y, name, approx)
        close(got[name][0], Bw)
        close(got[name][1], Aw)
