"""Contraction schedules: FLOPs and time of 'naive' against optimized paths, and slicing to a
memory budget (predicted and measured peak, time), in one run.

    python benchmarks/schedules.py --threads 2 [--device cuda] [--out docs]

Writes ``schedules.md`` and ``schedules.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import os
import re

import torch
from torch import nn

import hogc
from hogc.examples import PROBLEMS
from hogc.schedule import _call, _vector, derivative_flops, markdown_table, plot_rows, run_schedules
from hogc.timing import median_time, peak_memory

#: (problem, batch, quantity, what the optimized path avoids)
FLOP_CASES = [
    ("linear", 128, "batch_l2", "the (N, O, I) per-sample gradients: (sum_o g^2)(sum_i x^2)"),
    ("pair_sequence_mlp", 128, "ggn_diag", "(C, N, O, I) columns of a Linear shared over 2 positions"),
    ("tanh_mlp", 128, "ggn_eigen", "the (C, N, P) Jacobian columns of the Gram matrix S^T J J^T S"),
    ("tanh_mlp", 128, "ggnvp", "the (C, N, P) Jacobian columns before applying them to v"),
]


def flop_table(device, repeat):
    lines = ["| problem | quantity | derivative FLOPs naive | optimized | FLOP ratio | time naive ms | "
             "optimized ms | time ratio | avoided |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, batch, q, what in FLOP_CASES:
        model, x, y, lf = PROBLEMS[name](batch)
        model, x, y = model.to(device), x.to(device), y.to(device)
        v = _vector(model, q)
        row = {}
        for opt in ("naive", "auto"):
            _, dflops = derivative_flops(model, x, y, lf, q, optimize=opt)
            fn = hogc.compile(model, q, lf, optimize=opt)
            row[opt] = (dflops, median_time(lambda: _call(fn, x, y, v), repeat))
        (fn_, tn), (fo, to) = row["naive"], row["auto"]
        lines.append(f"| {name} (N={batch}) | {q} | {fn_:.3g} | {fo:.3g} | {fn_ / fo:.1f}x | {tn * 1e3:.2f} | "
                     f"{to * 1e3:.2f} | {tn / to:.1f}x | {what} |")
    return "\n".join(lines)


def budget_table(device, repeat):
    model, x, y, lf = PROBLEMS["sequence_mlp"](128)
    model, x, y = model.to(device), x.to(device), y.to(device)
    q = "sum_grad_squared"
    base = hogc.compile(model, q, lf)
    base(x, y)
    unsliced = peak_memory(lambda: base(x, y), device.type)
    t0 = median_time(lambda: base(x, y), repeat)
    lines = [f"unsliced: measured peak {unsliced / 2**20:.2f} MiB, predicted {base.explain().predicted_peak / 2**20:.2f}"
             f" MiB, {t0 * 1e3:.2f} ms", "",
             "| budget | MiB | slices | predicted peak MiB | measured peak MiB | under budget | median ms | "
             "time / unsliced |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for frac in (0.5, 0.25, 0.1):
        budget = int(frac * unsliced)
        fn = hogc.compile(model, q, lf, memory_budget=budget)
        try:
            fn(x, y)
        except hogc.MemoryBudgetError as e:
            need = re.search(r"at least (\d+) bytes", str(e)).group(1)
            lines.append(f"| {frac:.0%} of unsliced | {budget / 2**20:.2f} | cannot be met: needs at least "
                         f"{int(need) / 2**20:.2f} MiB | | | | | |")
            continue
        ex = fn.explain()
        meas = peak_memory(lambda: fn(x, y), device.type)
        t = median_time(lambda: fn(x, y), repeat)
        slices = sum(n.slices for n in ex.networks if n.slices > 1)
        lines.append(f"| {frac:.0%} of unsliced | {budget / 2**20:.2f} | {slices} | {ex.predicted_peak / 2**20:.2f} | "
                     f"{meas / 2**20:.2f} | {'yes' if meas <= budget else '**no**'} | {t * 1e3:.2f} | {t / t0:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                f", {torch.get_num_threads()} threads")
    parts = [f"# Contraction schedules ({where})", "",
             "## Optimized paths against 'naive' (FLOPs beyond the forward pass, median time)", "",
             flop_table(device, args.repeat), "",
             "## Slicing to a memory budget: sum_grad_squared, sequence_mlp (Linear 256->256 shared over 8 "
             "positions), batch 128", "", budget_table(device, args.repeat), ""]
    model, x, y, lf = PROBLEMS["sequence_mlp"](128)
    model, x, y = model.to(device), x.to(device), y.to(device)
    rows = run_schedules(model, x, y, lf, "sum_grad_squared", ["naive", "greedy", "dp", "optimal"],
                         ["none", "50%", "25%", "10%"], args.repeat)
    parts += ["## Strategies and budgets (`hogc schedule`)", "",
              markdown_table(rows, "`hogc schedule --model sequence_mlp --quantity sum_grad_squared --batch 128 "
                                   "--optimize naive,greedy,dp,optimal --memory-budget none,50%,25%,10%`"), ""]
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    if plot_rows(rows, os.path.join(args.out, f"schedules{suffix}.png"), "sequence_mlp: sum_grad_squared"):
        parts.append(f"![schedules](schedules{suffix}.png)")
    text = "\n".join(parts)
    with open(os.path.join(args.out, f"schedules{suffix}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
