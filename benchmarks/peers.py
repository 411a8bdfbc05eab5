"""hogc against every peer: BackPACK, curvlinops, ASDL and the torch.func recipes, on the MNIST
MLP, DeepOBS 3c3d, the zoo's ResNet and its transformer. Time and peak memory of each quantity a
library supports, as ratios to the plain autograd gradient measured in the same run (medians of
interleaved rounds; peaks from the torch profiler's allocation events). Writes docs/peers.md and
docs/peers.png.

    python benchmarks/peers.py [--repeat 5] [--threads 2] [--inductor]
"""
from __future__ import annotations

import argparse
import copy
import functools
import re
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

import hogc
from hogc.examples import mnist_mlp
from hogc.timing import peak_memory
from hogc.zoo import ResNet, TinyGPT, c3d3

from curvature import measure, plain_runner
from first_order import backpack_runner, torch_func_runner

QUANTITIES = ["batch_l2", "sum_grad_squared", "ggn_diag", "ggn_diag_mc", "kflr", "hessian_diag", "ggnvp", "hvp"]
PEERS = ["hogc", "hogc-inductor", "hogc-lean", "BackPACK", "curvlinops", "ASDL", "torch.func"]
#: quantities where hogc also runs under memory_budget = the leanest peer's measured peak ("hogc-lean")
LEAN = ("ggn_diag", "ggn_diag_mc", "kflr", "hessian_diag")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def problems():
    torch.manual_seed(0)
    return {
        "MNIST MLP 784-512-256-10 (ReLU), batch 128": (mnist_mlp(), torch.randn(128, 784),
                                                        torch.randint(0, 10, (128,))),
        "3c3d, 3x32x32, batch 32": (c3d3(), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))),
        "ResNet (BatchNorm eval), batch 32": (ResNet().eval(), torch.randn(32, 3, 32, 32),
                                              torch.randint(0, 10, (32,))),
        "TinyGPT (d 16, 2 layers, T 8), batch 32": (TinyGPT(), torch.randint(0, 32, (32, 8)),
                                                    torch.randint(0, 32, (32, 8))),
    }


def _vector(model):
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}


def hogc_runner(model, x, y, q, backend="eager", memory_budget=None):
    fn = hogc.compile(model, q, seed=0, backend=backend, memory_budget=memory_budget)
    v = _vector(model) if fn.takes_vector else None
    return functools.partial(fn, x, y, v)


def backpack(model, x, y, q):
    if isinstance(model, (ResNet, TinyGPT)):
        return None  # BatchNorm in a residual graph, attention: outside BackPACK's module extensions
    if q == "hessian_diag":
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return None  # DiagHessian has no convolution + max-pooling second-order rules
        from backpack import backpack as ctx, extend
        from backpack import extensions as ext
        m, lf = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

        def run():
            m.zero_grad(set_to_none=True)
            with ctx(ext.DiagHessian()):
                lf(m(x), y).backward()
        return run
    if q not in ("batch_l2", "sum_grad_squared", "ggn_diag", "ggn_diag_mc", "kflr"):
        return None
    return backpack_runner(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, q)


def _flat(model, v):
    return torch.cat([v[k].flatten() for k, _ in model.named_parameters()])


def curvlinops(model, x, y, q):
    from curvlinops import GGNLinearOperator, HessianLinearOperator, KFACLinearOperator
    params = [p for p in model.parameters()]
    data, lf = [(x, y)], nn.CrossEntropyLoss()
    kw = dict(progressbar=False, check_deterministic=False)
    if q in ("ggnvp", "hvp"):
        op = (GGNLinearOperator if q == "ggnvp" else HessianLinearOperator)(model, lf, params, data, **kw)
        vec = _flat(model, _vector(model))
        return lambda: op @ vec
    if q == "kflr":
        if isinstance(model, TinyGPT):
            return None  # a weight tied between embedding and output layer
        supported = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()]

        def run():
            op = KFACLinearOperator(model, lf, supported, data, fisher_type="type-2", **kw)
            op.compute_kronecker_factors()
            return op
        return run
    return None


def asdl(model, x, y, q):
    import asdl as A
    if q not in ("ggn_diag", "ggn_diag_mc", "kflr") or isinstance(model, TinyGPT):
        return None  # TinyGPT: ASDL has no rules for embeddings and attention
    kind = A.FISHER_MC if q == "ggn_diag_mc" else A.FISHER_EXACT
    shape = A.SHAPE_KRON if q == "kflr" else A.SHAPE_DIAG
    m = copy.deepcopy(model)
    cfg = A.FisherConfig(fisher_type=kind, fisher_shapes=[shape], loss_type=A.LOSS_CROSS_ENTROPY,
                         data_size=x.shape[0], seed=0)
    maker = A.get_fisher_maker(m, cfg)

    def run():
        maker.setup_model_call(m, x)
        maker.setup_loss_call(nn.CrossEntropyLoss(), y)
        maker.forward_and_backward()
    return run


def torch_func(model, x, y, q):
    params = {k: v.detach() for k, v in model.named_parameters()}
    lf = nn.CrossEntropyLoss()

    def loss(p):
        return lf(functional_call(model, p, (x,)), y)
    if q == "hvp":
        v = _vector(model)
        return lambda: jvp(grad(loss), (params,), (v,))[1]
    if q == "ggnvp":
        v = _vector(model)

        def run():  # J^T H J v: jvp through the model, the loss Hessian on the output, vjp back
            out, Jv = jvp(lambda p: functional_call(model, p, (x,)), (params,), (v,))
            HJv = jvp(grad(lambda o: lf(o, y)), (out,), (Jv,))[1]
            _, pull = vjp(lambda p: functional_call(model, p, (x,)), params)
            return pull(HJv)[0]
        return run
    if q in ("batch_l2", "sum_grad_squared", "ggn_diag", "ggn_diag_mc"):
        return torch_func_runner(model, lf, x, y, q)
    return None


MAKERS = {"hogc": hogc_runner, "hogc-inductor": functools.partial(hogc_runner, backend="inductor"),
          "BackPACK": backpack, "curvlinops": curvlinops, "ASDL": asdl, "torch.func": torch_func}


def lean_runner(model, x, y, q, mem) -> tuple | None:
    """hogc under memory_budget = the leanest peer's measured peak for ``q`` (or the smallest budget
    hogc can meet, when that is higher), where hogc's own peak is above it: (runner, budget)."""
    peers = [m for (qq, p), m in mem.items() if qq == q and not p.startswith("hogc")]
    if (q, "hogc") not in mem or not peers or mem[(q, "hogc")] <= min(peers):
        return None
    budget = min(peers)
    try:
        run = hogc_runner(model, x, y, q, memory_budget=budget)
        run()
    except hogc.MemoryBudgetError as e:
        budget = int(re.search(r"at least (\d+) bytes", str(e)).group(1))
        run = hogc_runner(model, x, y, q, memory_budget=budget)
        run()
    return run, budget


def run_model(name, model, x, y, repeat, inductor) -> dict:
    runners, skipped = {"plain": plain_runner(model, x, y)}, {}
    for q in QUANTITIES:
        for peer in PEERS:
            if peer == "hogc-lean" or (peer == "hogc-inductor" and (not inductor or q not in ("batch_l2", "ggn_diag",
                                                                                             "hvp"))):
                continue
            try:
                run = MAKERS[peer](model, x, y, q)
                if run is not None:
                    run()
                    runners[(q, peer)] = run
            except Exception as e:  # a peer that cannot run this model: a table cell says so
                skipped[(q, peer)] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    mem = {k: peak_memory(run) for k, run in runners.items()}
    budgets = {}
    for q in LEAN:
        lean = lean_runner(model, x, y, q, {k: v for k, v in mem.items() if k != "plain"})
        if lean is not None:
            runners[(q, "hogc-lean")], budgets[q] = lean
            mem[(q, "hogc-lean")] = peak_memory(lean[0])
    med = measure(runners, repeat)
    return {"time": {k: v / med["plain"] for k, v in med.items()},
            "memory": {k: v / max(mem["plain"], 1) for k, v in mem.items()},
            "plain_ms": med["plain"] * 1e3, "plain_mib": mem["plain"] / 2**20, "skipped": skipped,
            "budgets": {q: b / 2**20 for q, b in budgets.items()}}


def table(name, r) -> list[str]:
    peers = [p for p in PEERS if any((q, p) in r["time"] for q in QUANTITIES)]
    rows = [f"### {name}", "",
            f"Plain gradient: {r['plain_ms']:.1f} ms, {r['plain_mib']:.1f} MiB peak = 1.00. Each cell: time / peak "
            f"memory, as multiples of the plain gradient's; **bold**: the fastest.", "",
            "| quantity | " + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers)]
    for q in QUANTITIES:
        have = {p: r["time"][(q, p)] for p in peers if (q, p) in r["time"]}
        if not have:
            continue
        best = min(have, key=have.get)
        cells = []
        for p in peers:
            if (q, p) not in r["time"]:
                cells.append("n/a" if (q, p) in r["skipped"] else "-")
                continue
            t = f"{r['time'][(q, p)]:.2f}"
            cells.append(f"{'**' + t + '**' if p == best else t} / {r['memory'][(q, p)]:.2f}")
        rows.append(f"| {q} | " + " | ".join(cells) + " |")
    if r.get("budgets"):
        rows += ["", "hogc-lean: `memory_budget` = the leanest peer's measured peak, or the smallest budget hogc "
                     "can meet where that is higher (" + ", ".join(f"{q}: {b:.1f} MiB" for q, b in
                                                                 r["budgets"].items()) + ")."]
    if r["skipped"]:
        rows += ["", "n/a: " + "; ".join(f"{p} {q}: {why}" for (q, p), why in r["skipped"].items())]
    return rows + [""]


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(PEERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), squeeze=False)
    w = 0.8 / len(PEERS)
    for ax, (name, r) in zip(axes[0], results.items()):
        qs = [q for q in QUANTITIES if any((q, p) in r["time"] for p in PEERS)]
        for k, p in enumerate(PEERS):  # one slot and one colour per library in every panel
            xs = [i + k * w for i, q in enumerate(qs) if (q, p) in r["time"]]
            ys = [r["time"][(q, p)] for q in qs if (q, p) in r["time"]]
            if xs:
                ax.bar(xs, ys, w, label=p, color=colors[p])
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(qs))], qs, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(name.split(",")[0], fontsize=9)
        ax.set_ylabel("time / plain gradient")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(md: str) -> dict:
    """Results back from docs/peers.md (to redraw the plot and the targets without rerunning)."""
    results, name, cols = {}, None, None
    for line in md.splitlines():
        if line.startswith("### "):
            name = line[4:]
            results[name] = {"time": {}, "memory": {}}
        elif line.startswith("| quantity"):
            cols = [c.strip() for c in line.strip("|").split("|")][1:]
        elif name and line.startswith("| ") and cols and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for p, cell in zip(cols, cells[1:]):
                if "/" in cell and cell != "n/a":
                    t, m = cell.split("/")
                    results[name]["time"][(cells[0], p)] = float(t.strip(" *"))
                    results[name]["memory"][(cells[0], p)] = float(m.strip(" *"))
    return results


#: issue 7's quantities that must be 10x faster than the torch.func recipe
CURVATURE = ("ggn_diag", "ggn_diag_mc", "kflr", "hessian_diag", "ggnvp", "hvp")


def targets(results: dict) -> list[str]:
    """Issue 7's CPU targets, checked on this run's numbers: one row per target, its misses named."""
    def short(name):
        return re.split(r"[ ,]", name)[0]

    def check(pairs, goal):  # pairs: (label, ratio); ratio >= goal passes
        pairs = list(pairs)
        if not pairs:
            return "not run", "-"
        miss = [f"{lab} {r:.2f}x" for lab, r in pairs if r < goal]
        lo, hi = min(r for _, r in pairs), max(r for _, r in pairs)
        span = f"{lo:.2f}x" if len(pairs) == 1 else f"{lo:.2f}x to {hi:.2f}x over {len(pairs)}"
        return ("met" if not miss else f"missed ({len(miss)} of {len(pairs)})",
                span + ("; short: " + ", ".join(miss) if miss and len(pairs) > 1 else ""))

    def hogc_time(r, q):
        return min((r["time"][(q, p)] for p in ("hogc", "hogc-inductor") if (q, p) in r["time"]), default=None)

    def ratios(peer, quantities, models=None):
        for name, r in results.items():
            if models and short(name) not in models:
                continue
            for q in quantities:
                h = hogc_time(r, q)
                if h is not None and (q, peer) in r["time"]:
                    yield f"{short(name)} {q}", r["time"][(q, peer)] / h

    def memory():
        for name, r in results.items():
            for q in QUANTITIES:
                cells = {k: m for k, m in r["memory"].items() if isinstance(k, tuple) and k[0] == q}
                ours = [m for (_, p), m in cells.items() if p.startswith("hogc")]
                theirs = [m for (_, p), m in cells.items() if not p.startswith("hogc")]
                if ours and theirs:
                    yield f"{short(name)} {q}", min(theirs) / min(ours)

    rows = [("every quantity shared with BackPACK at least as fast", *check(ratios("BackPACK", QUANTITIES), 1.0)),
            ("3c3d `ggn_diag` at least 2x BackPACK", *check(ratios("BackPACK", ["ggn_diag"], ["3c3d"]), 2.0)),
            ("`hessian_diag` at least 5x BackPACK", *check(ratios("BackPACK", ["hessian_diag"]), 5.0)),
            ("GGN/Hessian quantities at least 10x torch.func", *check(ratios("torch.func", CURVATURE), 10.0)),
            ("peak memory no higher than the leanest peer's", *check(memory(), 1.0))]
    return ["## Issue-7 targets in this run (CPU)", "",
            "Ratios are peer / hogc (time: the faster of eager and Inductor; memory: the leanest of hogc, "
            "hogc-inductor and hogc-lean), so 1x is parity. Why each miss happens: docs/benchmarks.md.", "",
            "| target | status | measured |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--inductor", action="store_true", help="also hogc with backend='inductor' (compiles take minutes)")
    ap.add_argument("--models", type=str, default="", help="comma-separated prefixes of the models to run")
    ap.add_argument("--replot", action="store_true", help="only redraw docs/peers.png from docs/peers.md")
    args = ap.parse_args()
    if args.replot:  # the plot and the targets section, from the tables already in docs/peers.md
        md = (DOCS / "peers.md").read_text()
        results = parse(md)
        head, tables = md[:md.index("## Issue-7") if "## Issue-7" in md else md.index("### ")], md[md.index("### "):]
        (DOCS / "peers.md").write_text(head + "\n".join(targets(results)) + "\n" + tables)
        plot(results, DOCS / "peers.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name, (model, x, y) in problems().items():
        if args.models and not any(name.startswith(m) for m in args.models.split(",")):
            continue
        results[name] = run_model(name, model, x, y, args.repeat, args.inductor)
        print("\n".join(table(name, results[name])), flush=True)
    head = ["# hogc against its peers (`benchmarks/peers.py`, one run per model)", "",
            f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, float32. Ratios to the plain "
            f"autograd gradient of the same model in the same run; `-`: the library has no such quantity or "
            f"cannot run the model; n/a: it raised (reason below the table).", ""]
    (DOCS / "peers.md").write_text("\n".join(head + targets(results) +
                                              [ln for n, r in results.items() for ln in table(n, r)]))
    plot(results, DOCS / "peers.png")


if __name__ == "__main__":
    main()
