"""The fused square-then-contract kernel (``hogc.emit.square_kernel``, Triton; interpreted on the
CPU) equals einsum-then-square, the pass puts it where the policy says, and the cost model picks
it for memory-bound products only."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import hogc
import hogc.passes.kernels as K
from hogc.emit.square_kernel import square_problem, triton_available
from hogc.timing import peak_memory
from hogc.examples import SequenceMLP
from hogc.zoo import c3d3

from .test_zoo import ZOO

pytestmark = pytest.mark.skipif(not triton_available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="needs triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # (product, square, sizes): every way the result keeps or sums V's letter groups
    ("ncop,nip->ncoi", "ncoi->oi", dict(n=3, c=4, o=5, p=7, i=33)),  # ggn_diag of a convolution
    ("nop,nip->noi", "noi->n", dict(n=3, o=40, p=7, i=35)),  # batch_l2: tiles summed both ways
    ("nop,nip->noi", "noi->oi", dict(n=3, o=40, p=7, i=35)),  # sum_grad_squared
    ("nco,ni->ncoi", "ncoi->oi", dict(n=3, c=4, o=5, i=6)),  # no contracted letter
    ("ncop,nip->ncoi", "ncoi->io", dict(n=2, c=3, o=17, p=40, i=9)),  # result transposed, K > one tile
    ("ncop,nip->ncoi", "ncoi->nc", dict(n=2, c=3, o=17, p=40, i=9)),  # samples and columns kept
    ("ncop,nip->ncoi", "ncoi->", dict(n=2, c=3, o=17, p=40, i=9)),  # everything summed
    ("ncop,nip->ncoi", "ncoi->co", dict(n=2, c=3, o=17, p=40, i=9)),  # rows kept, columns summed
    ("pnco,ipn->icon", "icon->oi", dict(n=3, c=2, o=5, p=6, i=4)),  # letters in any order
    ("nacp,nbip->nacbi", "nacbi->ai", dict(n=2, a=3, c=2, b=2, p=5, i=3)),  # several letters per group
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("product,square,sizes", CASES, ids=[f"{p}|{s}" for p, s, _ in CASES])
def test_kernel_equals_einsum_then_square(product, square, sizes, dtype):
    g = torch.Generator().manual_seed(0)
    sa, sb = product.split("->")[0].split(",")
    a = torch.randn([sizes[c] for c in sa], generator=g, dtype=dtype).to(DEVICE)
    b = torch.randn([sizes[c] for c in sb], generator=g, dtype=dtype).to(DEVICE)
    got = torch.ops.hogc.square_product(a, b, product, square)
    want = torch.einsum(square, torch.einsum(product, a.double(), b.double()) ** 2)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())


def test_products_the_kernel_does_not_take():
    sizes = dict(a=2, b=3, c=4)
    assert square_problem("aab,bc->ac", "ac->c", sizes) is None  # a diagonal
    assert square_problem("ab,bc->c", "c->c", sizes) is None  # a summed on one side alone
    with pytest.raises(ValueError, match="not a product the kernel takes"):
        torch.ops.hogc.square_product(torch.ones(2, 3), torch.ones(3, 4), "ab,bc->c", "c->c")


@pytest.mark.parametrize("zoo", ZOO, ids=lambda z: z.id)
def test_fused_programs_equal_library_programs(zoo, monkeypatch):
    """Every match in the zoo's GGN diagonals and per-sample norms rewritten to the kernel: the same
    numbers as the GEMM-then-square program, and explain() names each fused kernel."""
    model, lf, x, y = zoo.data()
    qs = ("ggn_diag", "batch_l2", "sum_grad_squared", "variance")
    monkeypatch.setattr(K, "SQUARE_KERNEL", "never")
    want = hogc.compile(model, qs, loss=lf)(x, y)
    monkeypatch.setattr(K, "SQUARE_KERNEL", "always")
    fn = hogc.compile(model, qs, loss=lf)
    got = fn(x, y)
    fused = [c for c in fn.explain().contractions if "[fused kernel" in c.equation]
    assert fused and "hogc.square_product" in fn.code
    for q in qs:
        for k in want[q]:
            scale = float(want[q][k].abs().max())
            assert float((got[q][k] - want[q][k]).abs().max()) <= 1e-5 * scale + 1e-30, (q, k)


def test_fused_program_is_one_graph_for_torch_compile(monkeypatch):
    monkeypatch.setattr(K, "SQUARE_KERNEL", "always")
    torch.manual_seed(0)
    model = c3d3(widths=(4, 6, 8), hidden=(16, 12)).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    fn = hogc.compile(model, ("ggn_diag", "batch_l2"))
    spec, args = fn._arguments(x, y)
    dynamo.reset()
    want = spec.gm(*args)
    got = torch.compile(spec.gm, backend="eager", fullgraph=True)(*args)  # raises at a graph break
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got, want))


def test_memory_model_counts_the_kernel(monkeypatch):
    """The predicted peak stays within 20% of the measured one with the kernel in the program
    (a Linear shared over positions: sum_grad_squared squares its (N, O, I) per-sample gradients)."""
    monkeypatch.setattr(K, "SQUARE_KERNEL", "always")
    torch.manual_seed(0)
    model = SequenceMLP(seq=4, d=128, width=128, d_out=5).double()
    x, y = torch.randn(16, 4, 128, dtype=torch.float64), torch.randint(0, 5, (16,))
    fn = hogc.compile(model, ("sum_grad_squared",))
    fn(x, y)
    ex = fn.explain()
    assert any("[fused kernel" in c.equation for c in ex.contractions)
    measured = peak_memory(lambda: fn(x, y))
    assert abs(ex.predicted_peak - measured) <= 0.2 * measured, (ex.predicted_peak, measured)


def test_cost_model_picks_memory_bound_products_only():
    """On the CUDA model: a short contraction over many tiles (a late convolution's ggn_diag)
    fuses; a long one (an early convolution: 1024 positions) and a small product do not."""
    short = square_problem("ncop,nip->ncoi", "ncoi->oi", dict(n=32, c=10, o=128, p=16, i=1152))
    long = square_problem("ncop,nip->ncoi", "ncoi->oi", dict(n=32, c=10, o=64, p=1024, i=27))
    small = square_problem("ncop,nip->ncoi", "ncoi->oi", dict(n=4, c=10, o=8, p=4, i=8))
    assert K.choose_fused(short, 4, "cuda")[0]
    assert not K.choose_fused(long, 4, "cuda")[0]
    pick, why = K.choose_fused(small, 4, "cuda")
    assert not pick and "launch overhead" in why
    fused, unfused = K.fused_estimate(short, 4, K.DEVICE_MODELS["cuda"])
    assert fused < unfused


def test_policy_errors(monkeypatch):
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    monkeypatch.setattr(K, "SQUARE_KERNEL", "sometimes")
    with pytest.raises(hogc.HogcError, match="unknown square-kernel policy 'sometimes'"):
        hogc.compile(model, "ggn_diag")(x, y)
    if DEVICE == "cpu":
        monkeypatch.setattr(K, "SQUARE_KERNEL", "always")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(hogc.HogcError, match="TRITON_INTERPRET=1"):
            hogc.compile(model, "ggn_diag")(x, y)
