"""The ``hogc`` command line: ``hogc schedule`` benchmarks contraction schedules.

    hogc schedule --model sequence_mlp --quantity sum_grad_squared \\
        --optimize naive,greedy,dp,optimal --memory-budget none,50%,25% --plot schedules.png
"""
from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def _schedule(args) -> int:
    from .examples import load_problem
    from .passes.paths import PATH_STRATEGIES
    from .schedule import markdown_table, plot_rows, run_schedules

    from .errors import HogcError
    from .quantities import get_quantity
    from .schedule import parse_budget

    strategies = [s.strip() for s in args.optimize.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in PATH_STRATEGIES]
    if not strategies:
        print("hogc schedule: --optimize names no strategy", file=sys.stderr)
        return 2
    if unknown:
        print(f"hogc schedule: unknown strategy {unknown[0]!r}; registered: {sorted(PATH_STRATEGIES)}",
              file=sys.stderr)
        return 2
    if args.repeat < 1 or args.batch < 1 or args.threads < 0:
        print("hogc schedule: --repeat and --batch must be at least 1, --threads at least 0", file=sys.stderr)
        return 2
    if args.markdown:
        try:
            open(args.markdown, "a").close()  # fail now, not after the whole run
        except OSError as e:
            print(f"hogc schedule: cannot write --markdown {args.markdown}: {e.strerror}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [b.strip() for b in args.memory_budget.split(",") if b.strip()] or ["none"]
    try:
        get_quantity(args.quantity)
        for b in budgets:
            parse_budget(b, 1)
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"unknown device '{args.device}' (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{args.device}' is not available (torch.cuda.is_available() is False)")
        model, x, y, loss = load_problem(args.model, args.batch)
        model, x, y = model.to(device), x.to(device), y.to(device)
        rows = run_schedules(model, x, y, loss, args.quantity, strategies, budgets, args.repeat,
                             progress=not args.quiet)
    except (ValueError, RuntimeError, HogcError) as e:
        print(f"hogc schedule: {e}", file=sys.stderr)
        return 2
    title = (f"`hogc schedule --model {args.model} --quantity {args.quantity} --batch {args.batch}` "
             f"({x.device.type}, {torch.get_num_threads()} threads)")
    table = markdown_table(rows, title)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.plot and not plot_rows(rows, args.plot, f"{args.model}: {args.quantity}"):
        print("hogc schedule: matplotlib is not installed; no plot written (pip install matplotlib)",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hogc", description="hogc: a higher-order graph compiler for PyTorch")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schedule", help="benchmark contraction schedules and memory budgets for one quantity")
    s.add_argument("--model", required=True,
                   help="a built-in problem (see hogc.examples.PROBLEMS) or module:callable returning "
                        "(model, x, y[, loss]) for a batch size")
    s.add_argument("--quantity", required=True, help="a quantity name, e.g. ggn_diag")
    s.add_argument("--optimize", default="naive,greedy,dp,optimal", help="comma-separated path strategies")
    s.add_argument("--memory-budget", default="none",
                   help="comma-separated budgets: none, bytes (4MB, 1.5GiB) or a percentage of the unsliced "
                        "measured peak (25%%)")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--repeat", type=int, default=5, help="timed calls per configuration (median)")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--markdown", help="also write the table to this file")
    s.add_argument("--plot", help="write a plot (png) of time and memory against strategy and budget")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.command == "schedule":
        return _schedule(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
