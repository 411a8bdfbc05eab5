"""The rule tables: completeness, and every VJP rule against autograd on a one-op program."""
from __future__ import annotations

import pytest
import torch

from hogc.emit.fx import EMITTERS, emit
from hogc.ir import SAMPLE, Index, Node, Op, Program, Variance, build as B
from hogc.ir.ops import LEAF_OPS, LOSS_OPS, TERMINAL_OPS
from hogc.passes.backpropagate import backpropagate
from hogc.passes.vjp_rules import cot_indices, rule_kinds, vjp_rules

N = 3
_n = Index("n", N, SAMPLE, Variance.BATCH)


def _inp(name, shape, sample=True):
    idx = ((_n,) if sample else ()) + tuple(Index(f"{name}{k}", s, f"{name}{k}", Variance.UP)
                                            for k, s in enumerate(shape))
    return B.inp("param", name, idx)


def _examples():
    a23, b3 = _inp("a", (2, 3)), _inp("b", (3,), sample=False)
    a34 = _inp("a", (3, 4))
    pos = B.elementwise("exp", 0, (), b3)
    return {
        Op.EINSUM: lambda: B.einsum(["nij", "jk"], "nik", [a23, _inp("b", (3, 4), sample=False)]),
        Op.ADD: lambda: B.add(a23, b3),
        Op.SUB: lambda: B.sub(b3, a23),
        Op.MUL: lambda: B.mul(a23, b3),
        Op.DIV: lambda: B.div(a23, pos),
        Op.ELEMENTWISE: lambda: B.elementwise("tanh", 0, (), a23),
        Op.SUM: lambda: B.sum_dims(a34, [2]),
        Op.RESHAPE: lambda: B.reshape(a34, (N, 12)),
        Op.PERMUTE: lambda: B.permute(a34, (0, 2, 1)),
        Op.EXPAND: lambda: B.expand(_inp("a", (1, 4)), (N, 3, 4)),
        Op.SLICE: lambda: B.slice_(_inp("a", (6,)), 1, 1, 5, 2),
        Op.PAD: lambda: B.pad(_inp("a", (3,)), 1, 1, 2, 7, Index("p", 7, "p", Variance.UP)),
        Op.INDEX: lambda: B.index(_inp("a", (5,)), 1, (0, 3, 3, 1)),
        Op.INDEX_ADD: lambda: B.index_add(_inp("a", (4,)), 1, (0, 2, 2, 1), 3, Index("q", 3, "q", Variance.UP)),
        Op.GATHER: lambda: B.gather(_inp("a", (5,)), _int_index((N, 4), 5), -1),
        Op.SCATTER_ADD: lambda: B.scatter_add(_inp("a", (2, 4)), _int_index((4,), 3), -1, 3,
                                              Index("q", 3, "q", Variance.UP)),
        Op.CAT: lambda: B.cat([_inp("a", (2,)), _inp("c", (3,))], 1),
    }


def _int_index(shape, high):
    """A runtime-index operand: integer constants with repeats (so scatter-adds accumulate)."""
    t = torch.randint(0, high, shape, generator=torch.Generator().manual_seed(2))
    return B.const_tensor(t, [Index(f"g{k}", d, f"g{k}", Variance.UP) for k, d in enumerate(shape)])


EXAMPLES = _examples()


def test_every_op_has_a_vjp_rule_or_is_exempt():
    missing = [op.name for op in Op if op not in vjp_rules and op not in LEAF_OPS | LOSS_OPS | TERMINAL_OPS]
    assert not missing, f"ops without a reverse-mode rule: {missing}"


def test_every_op_has_an_emitter():
    missing = [op.name for op in Op if op not in EMITTERS and op is not Op.INPUT]
    assert not missing, f"ops without an emitter: {missing}"


def test_rule_kinds_table():
    """Which ops have which rule orders and structural kind (second-order rules arrive with Hessian
    backpropagation; a linear op's will be zero, a multilinear op's a cross term)."""
    table = {op.name: (rule_kinds.get(op), ["vjp"] if op in vjp_rules else []) for op in Op}
    assert table["EINSUM"] == ("multilinear", ["vjp"]) and table["MUL"][0] == "multilinear"
    assert all(table[o][0] == "linear" for o in ("ADD", "SUB", "SUM", "RESHAPE", "PERMUTE", "EXPAND", "SLICE",
                                                 "PAD", "INDEX", "INDEX_ADD", "GATHER", "SCATTER_ADD",
                                                 "CAT"))
    assert table["ELEMENTWISE"][0] == "elementwise" and table["LOSS"] == (None, [])


def _check_vjp(out):
    prog = Program.of({"out": out})
    params = {n.arg[1]: n for n in prog.inputs("param")}
    seed = B.inp("data", "seed", cot_indices(out, (), _n))
    cots = backpropagate(out, seed, (), params)
    program = Program.of({"out": out, **{f"cot/{k}": v for k, v in cots.items()}})
    names = sorted(params)
    gm = emit(program, [("param", k) for k in names] + [("data", "seed")])
    g = torch.Generator().manual_seed(0)
    vals = {k: torch.randn(params[k].shape, generator=g, dtype=torch.float64, requires_grad=True) for k in names}
    seed_v = torch.randn(seed.shape, generator=g, dtype=torch.float64)
    res = dict(zip(program.outputs, gm(*[vals[k] for k in names], seed_v)))
    y = res["out"]
    for k in names:
        if params[k].has_sample:
            want = torch.autograd.grad(y, vals[k], seed_v, retain_graph=True)[0]
        else:
            want = torch.stack([torch.autograd.grad(y[i], vals[k], seed_v[i], retain_graph=True)[0]
                                for i in range(N)])
        torch.testing.assert_close(res[f"cot/{k}"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", sorted(set(vjp_rules) - {Op.NONDIFF}, key=lambda o: o.name), ids=lambda o: o.name)
def test_vjp_rule_matches_autograd(op):
    assert op in EXAMPLES, f"add a one-op example for {op.name} to tests/test_rules.py"
    out = EXAMPLES[op]()
    assert out.op is op
    _check_vjp(out)


def _shift_invariant(kind: str):
    """softmax / log-softmax with the max shift a NONDIFF node: the zero rule of the shift is exact
    because the result does not depend on it (autograd of the emitted program differentiates torch.amax)."""
    a = B.mul(_inp("a", (5,)), _inp("w", (5,), sample=False))
    z = B.sub(a, B.nondiff("amax", ((1,),), a))
    e = B.elementwise("exp", 0, (), z)
    s = B.reshape(B.sum_dims(e, [1]), (N, 1))
    return B.div(e, s) if kind == "softmax" else B.sub(z, B.elementwise("log", 0, (), s))


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
def test_nondiff_shift_has_zero_derivative(kind):
    out = _shift_invariant(kind)
    assert Op.NONDIFF in {n.op for n in Program.of({"o": out}).nodes}
    _check_vjp(out)


EINSUM_VARIANTS = {
    "metric_letter": lambda: B.einsum(["ni", "i"], "n", [_inp("a", (4,)), _inp("b", (4,), sample=False)],
                                      metric="i"),
    "three_operand_hyperedge": lambda: B.einsum(["nij", "nj", "j"], "ni",
                                                [_inp("a", (2, 3)), _inp("c", (3,)), _inp("b", (3,), sample=False)]),
    "operand_used_twice": lambda: B.einsum(["ni", "ni", "ij"], "nj",
                                           [_inp("a", (3,)), _inp("a", (3,)), _inp("b", (3, 2), sample=False)]),
    "letter_only_in_one_operand": lambda: B.einsum(["nij", "k"], "nik",
                                                   [_inp("a", (2, 3)), _inp("b", (4,), sample=False)]),
    "parameter_only_operands": lambda: B.einsum(["ni", "ij", "jk"], "nk", [_inp("a", (2,)),
                                                                         _inp("b", (2, 3), sample=False),
                                                                         _inp("c", (3, 2), sample=False)]),
}


@pytest.mark.parametrize("name", sorted(EINSUM_VARIANTS))
def test_einsum_vjp_variants(name):
    _check_vjp(EINSUM_VARIANTS[name]())


def test_docs_ops_list_is_current():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "gen_ops.py"
    spec = importlib.util.spec_from_file_location("gen_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (path.with_name("ops.md")).read_text() == mod.render(), "run `python docs/gen_ops.py`"


# --- forward mode ------------------------------------------------------------------------------

S = 2
_s = Index("s", S, "tangent", Variance.BATCH)


def _derivative_examples():
    a = _inp("a", (3,))
    f = B.add(B.einsum(["ni", "io"], "no", [a, _inp("b", (3, 4), sample=False)]), _inp("c", (4,), sample=False))
    y = B.inp("target", "y", (_n,))
    from hogc.ir import LossSpec
    spec = LossSpec("cross_entropy", "mean")
    return {
        "ELEMENTWISE_order1_y": lambda: B.elementwise("tanh", 1, (), a, B.elementwise("tanh", 0, (), a)),
        "ELEMENTWISE_order2": lambda: B.elementwise("softplus", 2, (1.0, 20.0), a),
        "LOSS_GRAD": lambda: Node(Op.LOSS_GRAD, (f, y), spec, tuple(i.dual() for i in f.indices)),
        "LOSS": lambda: Node(Op.LOSS, (f, y), spec, ()),
        "LOSS_SQRT_HESSIAN": lambda: _sqrt_hessian(f, y, spec),
        "LOSS_SQRT_HESSIAN_bce_sum": lambda: _sqrt_hessian(f, y, LossSpec("bce_with_logits", "sum")),
        "LOSS_SQRT_HESSIAN_mse_mean": lambda: _sqrt_hessian(f, y, LossSpec("mse", "mean")),
    }


def _sqrt_hessian(f, y, spec):
    from hogc.passes.jvp_rules import num_columns

    c = Index("c", num_columns(spec, f.shape), "column", Variance.BATCH)
    return Node(Op.LOSS_SQRT_HESSIAN, (f, y), spec, (c,) + tuple(i.dual() for i in f.indices))


JVP_EXAMPLES = {op.name: fn for op, fn in EXAMPLES.items()} | _derivative_examples() | \
    {"NONDIFF": lambda: _shift_invariant("log_softmax")}  # the shift's zero tangent is exact


def _check_jvp(out):
    from torch.func import jvp

    from hogc.passes.push_forward import push_forward

    prog = Program.of({"out": out})
    params = {n.arg[1]: n for n in prog.inputs("param")}
    tans = {k: B.inp("data", f"t/{k}", (_s,) + p.indices) for k, p in params.items()}
    tan = push_forward({"out": out}, {params[k].uid: t for k, t in tans.items()})["out"]
    names = sorted(params)
    targets = [("target", "y")] if prog.inputs("target") else []
    program = Program.of({"out": out, "tan": tan})
    gm = emit(program, [("param", k) for k in names] + [("data", f"t/{k}") for k in names] + targets)
    fwd = emit(Program.of({"out": out}), [("param", k) for k in names] + targets)
    g = torch.Generator().manual_seed(0)
    vals = [torch.randn(params[k].shape, generator=g, dtype=torch.float64) for k in names]
    dirs = [torch.randn((S,) + params[k].shape, generator=g, dtype=torch.float64) for k in names]
    extra = [torch.tensor([0, 3, 1])] if targets else []
    got = gm(*vals, *dirs, *extra)[1]
    for s in range(S):
        _, want = jvp(lambda *p: fwd(*p, *extra)[0], tuple(vals), tuple(d[s] for d in dirs))
        torch.testing.assert_close(got[s], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(JVP_EXAMPLES))
def test_jvp_rule_matches_torch_func(name):
    _check_jvp(JVP_EXAMPLES[name]())


def test_every_differentiable_op_has_a_jvp_rule():
    from hogc.passes.jvp_rules import jvp_rules

    missing = [op.name for op in Op if op not in jvp_rules and op not in LEAF_OPS | TERMINAL_OPS
               and op not in (Op.LOSS_SQRT_HESSIAN_JVP, Op.LOSS_SQRT_HESSIAN_MC)]
    assert not missing, f"ops without a forward-mode rule: {missing}"
    covered = {op for op in jvp_rules if op.name in JVP_EXAMPLES or op.name in {"ELEMENTWISE"}}
    assert covered == set(jvp_rules), f"add forward-mode examples for {set(jvp_rules) - covered}"


def test_missing_forward_rule_names_the_op():
    from hogc.errors import MissingRuleError
    from hogc.ir import LossSpec
    from hogc.passes.push_forward import push_forward

    f = _inp("a", (3,))
    y = B.inp("target", "y", (_n,))
    c = Index("c", 3, "column", Variance.BATCH)
    t0 = B.inp("data", "t0", (_s,) + f.indices)
    sq = Node(Op.LOSS_SQRT_HESSIAN_JVP, (f, y, t0), LossSpec("cross_entropy", "mean"),
              (_s, c) + tuple(i.dual() for i in f.indices))
    t = B.inp("data", "t", (_s,) + f.indices)
    with pytest.raises(MissingRuleError, match="LOSS_SQRT_HESSIAN_JVP"):
        push_forward({"sq": sq}, {f.uid: t})


def test_every_op_has_a_second_order_residual_kind():
    from hogc.passes.residual_rules import RESIDUAL_KINDS, residual_kinds

    missing = [op.name for op in Op if op not in residual_kinds]
    assert not missing, f"ops without a second-order residual rule: {missing}"
    assert set(residual_kinds.values()) <= set(RESIDUAL_KINDS)
    # the structural kinds agree with the first-order table
    for op, kind in rule_kinds.items():
        if kind == "linear":
            assert residual_kinds[op] == "zero", op
        if kind == "multilinear":
            assert residual_kinds[op] == "cross", op


@pytest.mark.parametrize("fname", sorted(__import__("hogc.passes.elementwise", fromlist=["x"]).ELEMENTWISE_FNS))
def test_elementwise_residual_is_gradient_times_second_derivative(fname):
    from hogc.passes import elementwise as E
    from hogc.passes.residual_rules import residual

    fn = E.ELEMENTWISE_FNS[fname]
    u = _inp("u", (4,))
    y = B.elementwise(fname, 0, fn.example_params, u)
    g = B.inp("data", "g", tuple(i.dual() for i in y.indices))
    r = residual(y, g)
    if E.is_zero(fname, 2):
        assert r is None
        return
    gm = emit(Program.of({"r": r}), [("param", "u"), ("data", "g")])
    gen = torch.Generator().manual_seed(0)
    uv = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    if fn.domain == "positive":
        uv = uv.abs() + 0.2
    gv = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    want = gv * E.derivative(fname, 2)(uv, fn.forward(uv, *fn.example_params), *fn.example_params)
    torch.testing.assert_close(gm(uv, gv)[0], want)
