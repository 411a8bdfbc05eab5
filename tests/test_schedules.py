"""Contraction schedules: path strategies and slicing to a memory budget never change a number;
the budget is met (predicted and measured); optimized paths need far fewer FLOPs than 'naive';
``fn.explain()`` and the ``hogc schedule`` CLI report it all."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import hogc
from hogc.cli import main as cli_main
from hogc.examples import SequenceMLP
from hogc.schedule import derivative_flops, parse_budget
from hogc.timing import peak_memory

from .model_cases import CASES
from .test_quantities import GENERAL, close

QS = tuple(q for q in GENERAL if q not in ("ggnvp", "hvp"))  # products are covered below with a vector


def _run(model, lf, x, y, **kw):
    fn = hogc.compile(model, QS, loss=lf, mc_samples=2, seed=3, top_k=2, **kw)
    return fn, fn(x, y)


def _smallest_reachable(err: hogc.MemoryBudgetError) -> int:
    """The smallest budget the error says can be met."""
    return int(re.search(r"raise the budget to at least (\d+) bytes", str(err)).group(1))


FIRST = ("loss", "grad", "batch_grad", "batch_l2", "sum_grad_squared", "variance", "ggn_diag", "batch_ggn_diag",
         "ggn_diag_mc")


def _compare(got, ref, qs):
    for q in qs:
        if isinstance(ref[q], dict):
            for k in ref[q]:
                close(got[q][k], ref[q][k], rel=1e-12)
        else:
            close(got[q], ref[q], rel=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_budgets_and_strategies_never_change_a_number(case):
    """The foundation quantities one at a time (so that contractions, not results, can dominate
    the peak), unsliced 'auto' against 'naive' and against budgets of 50%, 25% and 0% of the
    predicted peak (an unreachable budget is retried at the smallest reachable peak it reports)."""
    model, lf, x, y = case.data()
    for q in FIRST:
        fn = hogc.compile(model, q, loss=lf, seed=3)
        ref = {q: fn(x, y)}
        peak = fn.explain().predicted_peak
        _compare({q: hogc.compile(model, q, loss=lf, seed=3, optimize="naive")(x, y)}, ref, [q])
        for frac in (0.5, 0.25, 0.0):
            budget = max(1, int(frac * peak))
            try:
                fb = hogc.compile(model, q, loss=lf, seed=3, memory_budget=budget)
                got = fb(x, y)
            except hogc.MemoryBudgetError as e:
                budget = _smallest_reachable(e)
                fb = hogc.compile(model, q, loss=lf, seed=3, memory_budget=budget)
                got = fb(x, y)
            assert fb.explain().predicted_peak <= budget
            _compare({q: got}, ref, [q])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_slicing_every_network_never_changes_a_number(case, monkeypatch):
    """Every network of every quantity cut as finely as slicing goes (a cap of 8 bytes), whether
    or not the memory needs it: chunks summed and concatenated give the same numbers."""
    import hogc.passes.pipeline as pipeline

    model, lf, x, y = case.data()
    _, ref = _run(model, lf, x, y)
    real = pipeline.contract_pairwise
    monkeypatch.setattr(pipeline, "contract_pairwise",
                        lambda program, strategy="auto", cap_bytes=None, itemsize=4: real(program, strategy, 8,
                                                                                           itemsize))
    fn, got = _run(model, lf, x, y)
    assert sum(n.slices > 1 for n in fn.explain().networks) >= 3
    _compare(got, ref, QS)


def test_products_under_a_budget():
    model, lf, x, y = CASES[5].data()
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    ref = hogc.compile(model, ("ggnvp", "hvp"), loss=lf)(x, y, v)
    try:
        got = hogc.compile(model, ("ggnvp", "hvp"), loss=lf, memory_budget=1)(x, y, v)
    except hogc.MemoryBudgetError as e:
        got = hogc.compile(model, ("ggnvp", "hvp"), loss=lf, memory_budget=_smallest_reachable(e))(x, y, v)
    for q in ref:
        for k in ref[q]:
            close(got[q][k], ref[q][k], rel=1e-12)


def _sequence():
    torch.manual_seed(0)
    model = SequenceMLP(seq=4, d=128, width=128, d_out=5).double()
    x, y = torch.randn(16, 4, 128, dtype=torch.float64), torch.randint(0, 5, (16,))
    return model, x, y


def test_budget_slices_the_dominant_intermediate_and_is_met():
    """sum_grad_squared of a Linear shared over positions materializes per-sample gradients
    (N x O x I); a quarter of the unsliced peak forces slicing over samples, and both the
    predicted and the measured peak (from tensor allocations) stay under the budget."""
    model, x, y = _sequence()
    fn = hogc.compile(model, "sum_grad_squared")
    ref = fn(x, y)
    unsliced = peak_memory(lambda: fn(x, y))
    assert abs(fn.explain().predicted_peak - unsliced) <= 0.2 * unsliced
    budget = unsliced // 4
    fb = hogc.compile(model, "sum_grad_squared", memory_budget=budget)
    got = fb(x, y)
    ex = fb.explain()
    sliced = [n for n in ex.networks if n.slices > 1]
    assert sliced and all(n.sliced for n in sliced)
    assert ex.predicted_peak <= budget
    assert peak_memory(lambda: fb(x, y)) <= budget
    for k in ref:
        close(got[k], ref[k], rel=1e-12)


def test_unreachable_budget_says_the_smallest_reachable_peak():
    model, x, y = _sequence()
    with pytest.raises(hogc.MemoryBudgetError, match=r"memory_budget=1000 bytes cannot be met: the smallest "
                                                     r"reachable predicted peak is \d+ bytes.*at least \d+") as info:
        hogc.compile(model, "ggn_diag", memory_budget=1000)(x, y)
    reach = _smallest_reachable(info.value)
    fn = hogc.compile(model, "ggn_diag", memory_budget=reach)
    fn(x, y)
    assert fn.explain().predicted_peak <= reach


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1MB", True])
def test_memory_budget_must_be_positive_bytes(bad):
    with pytest.raises(hogc.HogcError, match="memory_budget must be a positive number of bytes"):
        hogc.compile(nn.Linear(2, 2), "grad", memory_budget=bad)


def test_optimized_paths_need_five_times_fewer_flops_than_naive():
    """Three derivative computations (FLOPs beyond the forward pass) where the path matters."""
    torch.manual_seed(0)
    problems = {
        # sum_oi (g_no x_ni)^2 = (sum_o g^2)(sum_i x^2): no per-sample gradient
        "batch_l2": (nn.Sequential(nn.Linear(64, 32)), torch.randn(16, 64), torch.randint(0, 32, (16,))),
        # a Linear shared over 2 positions: sum_cn (sum_t g_cnto x_nti)^2 through (n, t, s) products
        "ggn_diag": (SequenceMLP(seq=2, d=64, width=64, d_out=10), torch.randn(16, 2, 64),
                     torch.randint(0, 10, (16,))),
        # the GGN's Gram matrix S^T J J^T S: (g g^T)(x x^T), never the (C, N, P) Jacobian
        "ggn_eigen": (nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)), torch.randn(16, 32),
                      torch.randint(0, 10, (16,))),
    }
    for q, (model, x, y) in problems.items():
        lf = nn.CrossEntropyLoss()
        _, naive = derivative_flops(model, x, y, lf, q, optimize="naive")
        _, best = derivative_flops(model, x, y, lf, q, optimize="auto")
        assert naive >= 5 * best, (q, naive, best)


def test_explain_reports_networks_paths_slices_and_peak():
    model, x, y = _sequence()
    plain = hogc.compile(model, "sum_grad_squared")
    plain(x, y)
    budget = plain.explain().predicted_peak // 4
    fn = hogc.compile(model, "sum_grad_squared", memory_budget=budget)
    fn(x, y)
    ex = fn.explain()
    net = max(ex.networks, key=lambda n: n.flops)
    assert net.equation.count(",") >= 3 and "->" in net.equation
    assert "^" in net.legend and "_" in net.legend and "n." in net.legend  # variances
    assert len(net.path) == net.equation.count(",")
    assert net.slices > 1 and net.sliced and net.largest_bytes <= budget
    assert 0 < ex.predicted_peak <= 0.9 * budget
    assert ex.total_flops == sum(c.flops for c in ex.contractions)
    text = str(ex)
    assert "predicted peak memory" in text and net.equation in text and "memory_budget=" in text


def test_naive_contracts_left_to_right():
    from hogc.passes.paths import PATH_STRATEGIES

    assert PATH_STRATEGIES["naive"]([set("ab"), set("bc"), set("cd"), set("de")], set("ae"), {}) == \
        [(0, 1), (0, 2), (0, 1)]


def test_parse_budget():
    assert parse_budget("none") is None
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("4MB") == 4_000_000 and parse_budget("1KiB") == 1024 and parse_budget("77") == 77
    with pytest.raises(ValueError, match="cannot read memory budget"):
        parse_budget("lots")
    with pytest.raises(ValueError, match="relative"):
        parse_budget("10%")


def test_cli_schedule_table(capsys, tmp_path):
    md = tmp_path / "t.md"
    rc = cli_main(["schedule", "--model", "tanh_mlp", "--quantity", "ggn_diag", "--batch", "8",
                   "--optimize", "naive,greedy", "--memory-budget", "none,50%", "--repeat", "1", "--quiet",
                   "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("| naive") or ln.startswith("| greedy")]
    assert len(rows) == 4 and md.read_text().strip() == out.strip()


def user_problem(batch):  # used by the CLI test through module:callable
    return nn.Sequential(nn.Linear(3, 2)), torch.randn(batch, 3), torch.randint(0, 2, (batch,))


def test_cli_loads_module_callable_and_rejects_bad_input(capsys):
    rc = cli_main(["schedule", "--model", "tests.test_schedules:user_problem", "--quantity", "batch_l2",
                   "--optimize", "auto", "--repeat", "1", "--quiet"])
    assert rc == 0 and "| auto | none |" in capsys.readouterr().out
    assert cli_main(["schedule", "--model", "tanh_mlp", "--quantity", "grad", "--optimize", "fastest"]) == 2
    assert "unknown strategy 'fastest'" in capsys.readouterr().err
    assert cli_main(["schedule", "--model", "no_such_model", "--quantity", "grad", "--quiet"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_program_larger_than_the_device_is_refused(monkeypatch):
    """A schedule whose predicted peak exceeds the device's memory fails at compile time with
    advice, instead of being killed at run time."""
    import hogc.api as api

    model, x, y = _sequence()
    monkeypatch.setattr(api, "_device_memory", lambda device: 100_000)
    with pytest.raises(hogc.MemoryBudgetError, match=r"predicted peak memory is .* more than the 0.0 GiB of the "
                                                     r"cpu device; use optimize='auto' or set memory_budget="):
        hogc.compile(model, "sum_grad_squared", optimize="naive")(x, y)


def test_cotengra_strategy_when_installed():
    pytest.importorskip("cotengra")
    model, lf, x, y = CASES[5].data()
    qs = ("batch_l2", "ggn_diag", "ggn_eigen")
    ref = hogc.compile(model, qs, loss=lf, top_k=2)(x, y)
    got = hogc.compile(model, qs, loss=lf, top_k=2, optimize="cotengra")(x, y)
    _compare(got, ref, qs)


@pytest.mark.parametrize("case", ["resnet-grad", "resnet-ggn_diag", "c3d3-ggn_diag", "c3d3-kflr", "gpt-ggn_diag"])
def test_predicted_peak_matches_the_measured_one_on_the_zoo(case):
    """The liveness model of the emitted code (fn.explain().predicted_peak) within 20% of the
    peak the torch profiler measures, on convolution, pooling and attention programs."""
    from hogc.zoo import ResNet, TinyGPT, c3d3

    name, q = case.split("-")
    torch.manual_seed(0)
    if name == "resnet":
        model, x, y = ResNet(widths=(8, 16)).eval(), torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    elif name == "c3d3":
        model, x, y = c3d3(), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    else:
        model, x, y = TinyGPT(), torch.randint(0, 32, (8, 8)), torch.randint(0, 32, (8, 8))
    fn = hogc.compile(model, q)
    fn(x, y)
    measured = peak_memory(lambda: fn(x, y))
    assert abs(fn.explain().predicted_peak - measured) <= 0.2 * measured


def test_predicted_peak_of_a_chunked_and_sliced_program():
    """At the smallest budget hogc accepts (columns in chunks, networks sliced, batched products
    over views, identity reshapes of windows), the prediction stays within 10% of the measured
    peak: a conservative model would refuse budgets the program meets."""
    from hogc.zoo import c3d3

    torch.manual_seed(0)
    model, x, y = c3d3(), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with pytest.raises(hogc.MemoryBudgetError) as info:
        hogc.compile(model, "kflr", memory_budget=1)(x, y)
    budget = _smallest_reachable(info.value)
    fn = hogc.compile(model, "kflr", memory_budget=budget)
    fn(x, y)
    assert re.match(r"square-root columns in \d+ chunks", fn.explain().strategies["columns"])
    measured = peak_memory(lambda: fn(x, y))
    assert measured <= budget and abs(fn.explain().predicted_peak - measured) <= 0.1 * measured


def test_budget_below_the_column_stack_runs_columns_in_chunks():
    """The square-root columns' backward pass is one stacked tensor per layer that network slicing
    cannot cut; a budget below it runs the columns in chunks, one backward pass each (as
    curvlinops and ASDL loop over columns): the same numbers, the measured peak under the budget,
    and explain() says so. Quantities that do not sum over the columns are not chunked."""
    from hogc.zoo import c3d3

    torch.manual_seed(0)
    model = c3d3(widths=(16, 8, 8), hidden=(16, 12)).double().eval()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    qs = ("ggn_diag", "ggn_diag_mc", "batch_ggn_diag", "kflr", "hessian_diag")
    fn = hogc.compile(model, qs, seed=1, mc_samples=3)
    want = fn(x, y)
    budget = int(0.7 * peak_memory(lambda: fn(x, y)))
    fb = hogc.compile(model, qs, seed=1, mc_samples=3, memory_budget=budget)
    got = fb(x, y)
    assert re.match(r"square-root columns in [2-9]\d* chunks", fb.explain().strategies["columns"])
    assert peak_memory(lambda: fb(x, y)) <= budget
    for q in qs:
        for k in want[q]:
            pairs = zip(got[q][k], want[q][k]) if isinstance(want[q][k], tuple) else [(got[q][k], want[q][k])]
            for a, b in pairs:
                close(a, b, rel=1e-12)
