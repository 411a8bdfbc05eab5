"""Issue 6's model zoo (3c3d, a GroupNorm CNN, a ResNet with BatchNorm, a GPT-style transformer)
at small sizes: every quantity equals a float64 torch.func reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import hogc
from hogc.zoo import GroupNormCNN, ResNet, TinyGPT, c3d3

from .reference import BatchReference, Reference
from .test_partition import _phi_derivatives
from .test_quantities import EXACT, GENERAL, TOP_K, assert_matches, close


def _resnet():
    model = ResNet(in_channels=2, widths=(3, 4), classes=3)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(generator=g)
            m.bias.data.normal_(generator=g)
    return model.eval()


@dataclass(frozen=True)
class Zoo:
    id: str
    make: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    x: Callable[[torch.Generator], torch.Tensor]

    def data(self):
        torch.manual_seed(0)
        model = self.make().double()
        g = torch.Generator().manual_seed(1)
        x = self.x(g)
        with torch.no_grad():
            out = model(x)
        y = torch.randint(0, out.shape[1], (out.shape[0],) + tuple(out.shape[2:]), generator=g)
        lf = self.loss()
        if lf.ignore_index != -100 or out.ndim > 2:
            y.view(-1)[::5] = lf.ignore_index
        return model, lf, x, y


ZOO = [
    Zoo("c3d3", lambda: c3d3(3, (3, 4, 4), (6, 5), 4, size=16), nn.CrossEntropyLoss,
        lambda g: torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)),
    Zoo("groupnorm_cnn", lambda: GroupNormCNN(2, 4, 2, 3), lambda: nn.CrossEntropyLoss(reduction="sum"),
        lambda g: torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)),
    Zoo("resnet_bn_eval", _resnet, nn.CrossEntropyLoss,
        lambda g: torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)),
    Zoo("tiny_gpt", lambda: TinyGPT(vocab=7, d=8, heads=2, layers=1, context=4),
        lambda: nn.CrossEntropyLoss(ignore_index=5, label_smoothing=0.1),
        lambda g: torch.randint(0, 7, (3, 4), generator=g)),
]


def _reference(model, lf, x, y):
    if isinstance(model, TinyGPT):  # torch.func: no double forward-AD of fused attention; see zoo._LayerNorm
        model.set_fused(False)
    return Reference(model, lf, x, y)


@pytest.fixture(scope="module", params=ZOO, ids=lambda z: z.id)
def compiled(request):
    model, lf, x, y = request.param.data()
    fn = hogc.compile(model, GENERAL, loss=lf, mc_samples=2, seed=7, top_k=TOP_K)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    out = fn(x, y, v)
    ref = _reference(model, lf, x, y)
    ref.v = v
    return out, ref


def _assert_quantity(out, ref, quantity):
    got = out[quantity]
    if quantity in ("ggnvp", "hvp"):
        want = getattr(ref, quantity)(ref.v)
    else:
        want = ref.ggn_eigen(TOP_K) if quantity == "ggn_eigen" else getattr(ref, quantity)()
    if not isinstance(want, dict):
        close(got, want, rel=1e-9)
        return
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], rel=1e-9)


@pytest.mark.parametrize("quantity", EXACT + ["ggnvp", "hvp", "ggn_eigen"])
def test_zoo_quantity_matches_torch_func(compiled, quantity):
    _assert_quantity(*compiled, quantity)


@pytest.mark.parametrize("zoo", ZOO[1:], ids=lambda z: z.id)
def test_zoo_partition_tensors(zoo):
    model, lf, x, y = zoo.data()
    part = hogc.api.resolve_partition(model, "module")
    got = hogc.compile(model, ("partition_grad", "partition_hessian", "partition_d3", "partition_d3_diag"),
                       loss=lf, partition="module")(x, y)
    if isinstance(model, TinyGPT):
        model.set_fused(False)
    g1, g2, g3 = _phi_derivatives(model, lf, x, y, part)
    close(got["partition_grad"], g1, rel=1e-9)
    close(got["partition_hessian"], g2, rel=1e-9)
    close(got["partition_d3"], g3, rel=1e-8)
    close(got["partition_d3_diag"], torch.diagonal(torch.diagonal(g3), 0, 0, 1), rel=1e-8)


# --- models that couple their samples: batch quantities exact, per-sample ones refused ------------

class _BatchStandardized(nn.Module):
    """A hand-written batch standardization (mean and variance over the samples) between two
    linear layers: coupling through plain ops rather than the batch_norm kernel."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-3)
        return self.b(torch.tanh(h))


def _coupled_case(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "resnet_bn_train":
        model = _resnet().train().double()
        x = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)
        lf = nn.CrossEntropyLoss(label_smoothing=0.1)
        y = torch.randint(0, 3, (3,), generator=g)
    else:
        model, lf = _BatchStandardized().double(), nn.MSELoss()
        x = torch.randn(4, 3, generator=g, dtype=torch.float64)
        y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    return model, lf, x, y


COUPLED = ("resnet_bn_train", "batch_standardized_mse")
BATCH = tuple(q for q in GENERAL if not hogc.quantities.get_quantity(q).per_sample)


def _batch_reference(model, lf, x, y):
    if isinstance(model, ResNet):  # torch's train-mode batch_norm double backward is wrong: see zoo
        model.set_fused(False)
    return BatchReference(model, lf, x, y)


@pytest.fixture(scope="module", params=COUPLED)
def coupled(request):
    model, lf, x, y = _coupled_case(request.param)
    fn = hogc.compile(model, BATCH, loss=lf, mc_samples=2, seed=7, top_k=TOP_K)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    out = fn(x, y, v)
    assert "couples the samples" in fn.explain().strategies["samples"]
    ref = _batch_reference(model, lf, x, y)
    ref.v = v
    return out, ref


@pytest.mark.parametrize("quantity", [q for q in BATCH if q not in ("ggn_diag_mc", "ggn_eigen", "ggnvp", "hvp")]
                         + ["ggnvp", "hvp", "ggn_eigen"])
def test_coupled_batch_quantity_matches_torch_func(coupled, quantity):
    """Train-mode BatchNorm (and a hand-written batch standardization): the samples are coupled,
    and every batch quantity equals the whole-batch torch.func reference."""
    _assert_quantity(*coupled, quantity)


def test_coupled_ggn_diag_mc_is_unbiased():
    model, lf, x, y = _coupled_case("batch_standardized_mse")
    got = hogc.compile(model, "ggn_diag_mc", loss=lf, mc_samples=4000, seed=0)(x, y)
    want = BatchReference(model, lf, x, y).ggn_diag()
    scale = max(float(w.abs().max()) for w in want.values())  # a.bias: zero (the standardization removes it)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0.1, atol=0.02 * scale), k


def test_coupled_partition_tensors():
    model, lf, x, y = _coupled_case("resnet_bn_train")
    got = hogc.compile(model, ("partition_grad", "partition_hessian", "partition_d3"), loss=lf,
                       partition="module")(x, y)
    model.set_fused(False)
    g1, g2, g3 = _phi_derivatives(model, lf, x, y, hogc.api.resolve_partition(model, "module"))
    close(got["partition_grad"], g1, rel=1e-9)
    close(got["partition_hessian"], g2, rel=1e-9)
    close(got["partition_d3"], g3, rel=1e-8)


@pytest.mark.parametrize("quantity", [q for q in hogc.quantities.QUANTITIES
                                      if hogc.quantities.get_quantity(q).per_sample])
def test_coupled_per_sample_quantity_is_a_clear_error(quantity):
    model, lf, x, y = _coupled_case("resnet_bn_train")
    with pytest.raises(hogc.SampleMixingError, match=f"couples the samples.*Per-sample quantities \\({quantity}\\)"):
        hogc.compile(model, quantity, loss=lf)(x, y)


def test_coupled_call_leaves_running_statistics_alone():
    model, lf, x, y = _coupled_case("resnet_bn_train")
    before = {k: b.clone() for k, b in model.named_buffers()}
    hogc.compile(model, "grad", loss=lf)(x, y)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k


def test_convolution_networks_become_convolution_kernels():
    """Forward and input-backward convolutions are emitted as conv / conv_transpose calls (exact:
    the quantity tests above run through them), batch weight gradients as convolution backward."""
    from hogc.ir import Op

    model, lf, x, y = ZOO[0].data()
    fn = hogc.compile(model, "grad", loss=lf)
    got = fn(x, y)
    ops = [n for n in fn._require().program.nodes if n.op is Op.CONV]
    kinds = [n.arg[0] for n in ops]  # 3 forward, 2 transposed (input gradients), 3 batch weight gradients
    assert (kinds.count("forward"), kinds.count("transposed"), kinds.count("weight")) == (3, 2, 3)
    ref = Reference(model, lf, x, y).grad()
    for k in ref:
        close(got[k], ref[k])
    per_sample = hogc.compile(model, "batch_grad", loss=lf)  # per-sample weight gradients: grouped kernels
    got = per_sample(x, y)
    assert any(n.arg[0] == "weight" and n.arg[5] == x.shape[0] for n in per_sample._require().program.nodes
               if n.op is Op.CONV)
    ref = Reference(model, lf, x, y).batch_grad()
    for k in ref:
        close(got[k], ref[k])
    naive = hogc.compile(model, "grad", loss=lf, optimize="naive")  # contracts exactly what the passes wrote
    naive(x, y)
    assert not any(n.op is Op.CONV for n in naive._require().program.nodes)


class _BufferMaskAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(4, 12), nn.Linear(12, 3)
        self.register_buffer("mask", torch.ones(3, 3, dtype=torch.bool).tril())

    def forward(self, x):
        q, k, v = self.qkv(x).split(4, -1)
        return self.o(nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).flatten(1))


def test_attention_mask_in_a_buffer():
    torch.manual_seed(0)
    model = _BufferMaskAttention().double()
    x, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randint(0, 3, (2,))
    lf = nn.CrossEntropyLoss()
    got = hogc.compile(model, ("grad", "ggn_diag"), loss=lf)(x, y)
    ref = Reference(model, lf, x, y)
    assert_matches(got, ref, ("grad", "ggn_diag"))


def test_variance_with_too_large_a_correction_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2)))

    class Var(nn.Module):
        def forward(self, h):
            return torch.var(h, dim=2, correction=3)

    with pytest.raises(hogc.UnsupportedOpError, match="correction 3"):
        hogc.compile(nn.Sequential(model, Var()), "grad", loss=nn.MSELoss())(torch.randn(4, 3), torch.randn(4, 2))


def test_col2im_by_placed_slices_is_exact(monkeypatch):
    """The alternative scatter of convolution patterns (off by default: slower on CPU) stays exact."""
    from hogc.passes import selection

    monkeypatch.setattr(selection, "SCATTER_BY_SLICES", True)
    model, lf, x, y = ZOO[0].data()
    got = hogc.compile(model, ("grad", "ggn_diag"), loss=lf)(x, y)
    ref = Reference(model, lf, x, y)
    assert_matches(got, ref, ("grad", "ggn_diag"))


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 2, 5)),
    (lambda: nn.Conv2d(2, 3, (3, 4), padding="same", dilation=(2, 1)), (2, 2, 5, 6)),
])
def test_same_padding_with_an_odd_total(conv, shape):
    """torch pads one more zero on the right there; hogc pads the input explicitly."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x, y = torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    model(x)  # materialize the lazy layer
    lf = nn.CrossEntropyLoss()
    got = hogc.compile(model, ("grad", "ggn_diag", "hessian_diag"), loss=lf)(x, y)
    ref = Reference(model, lf, x, y)
    assert_matches(got, ref, ("grad", "ggn_diag", "hessian_diag"))


def test_dropout_in_train_mode_uses_the_mask_of_the_call():
    """The mask comes from the call's seed, drawn from its generator (seed= makes it reproducible),
    and the site's stream (hogc.emit.random); every quantity of the call sees the same mask: equal
    to the model with that mask fixed."""
    from hogc.emit.random import draw_seed, dropout_mask, stream_of

    torch.manual_seed(0)
    p, seed = 0.4, 11
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(p), nn.Linear(6, 3)).double().train()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    lf = nn.CrossEntropyLoss()
    fn = hogc.compile(model, ("loss", "grad", "batch_grad", "ggn_diag", "hessian_diag"), loss=lf, seed=seed)
    got = fn(x, y)
    call_seed = draw_seed(torch.Generator().manual_seed(seed), "cpu")
    mask = dropout_mask(torch.ones(5, 6, dtype=torch.float64), call_seed, p, stream_of("dropout"))
    assert 0 < int((mask == 0).sum()) < 30 and set(mask.unique().tolist()) <= {0.0, 1 / (1 - p)}

    class Fixed(nn.Module):  # the mask travels with its sample (the reference vmaps over samples)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, xm):
            h = self.inner[1](self.inner[0](xm[:, :4])) * xm[:, 4:]
            return self.inner[3](h)

    ref = Reference(Fixed(), lf, torch.cat([x, mask], 1), y)
    close(got["loss"], ref.loss())
    assert_matches(got, ref, ("grad", "batch_grad", "ggn_diag", "hessian_diag"), lambda k: k.removeprefix("inner."))
    assert torch.equal(fn(x, y)["grad"]["0.weight"], got["grad"]["0.weight"])  # same seed, same mask


class _PairLogits(nn.Module):
    """Contrastive logits z_i . z_j: samples paired with samples (caught in review: the output had
    two sample axes and was taken for per-sample)."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        z = torch.tanh(self.l(x))
        return z @ z.T


@pytest.mark.parametrize("kind", ["pairs", "merged"])
def test_samples_paired_or_merged_are_coupled(kind):
    torch.manual_seed(0)
    if kind == "pairs":
        model, x, y = _PairLogits().double(), torch.randn(5, 4, dtype=torch.float64), torch.arange(5)
    else:  # batch and sequence merged before a linear layer, the output (N T, C)
        model = nn.Sequential(nn.Flatten(0, 1), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    lf = nn.CrossEntropyLoss()
    qs = ("loss", "grad", "ggn_diag", "hessian_diag")
    got = hogc.compile(model, qs, loss=lf)(x, y)
    close(hogc.compile(model, "loss", loss=lf)(x, y), lf(model(x), y))
    ref = BatchReference(model, lf, x, y)
    for q in qs:
        _assert_quantity(got, ref, q)
    with pytest.raises(hogc.SampleMixingError, match="Per-sample quantities"):
        hogc.compile(model, "batch_grad", loss=lf)(x, y)
