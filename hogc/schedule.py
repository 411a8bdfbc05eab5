"""Contraction-schedule benchmarking: FLOPs, predicted and measured peak memory and wall time of
one quantity per path strategy and memory budget (the engine of ``hogc schedule`` and
``benchmarks/schedules.py``)."""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

import torch

from .api import compile as hogc_compile
from .errors import MemoryBudgetError
from .quantities import get_quantity
from .timing import median_time, peak_memory

__all__ = ["ScheduleRow", "parse_budget", "run_schedules", "markdown_table", "plot_rows", "derivative_flops"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class ScheduleRow:
    strategy: str
    budget: str  # as given: "none", "25%", "4MB", ...
    budget_bytes: int | None
    flops: int = 0  # the whole program
    derivative_flops: int = 0  # the program minus the forward pass
    slices: int = 1  # chunks over all networks
    predicted_peak: int = 0
    measured_peak: int = 0
    time: float = math.nan  # median seconds
    max_diff: float = 0.0  # against the first row's result
    error: str = ""


def parse_budget(text: str, reference: int | None = None) -> int | None:
    """'none' -> None; '25%' -> 25% of ``reference`` (the unsliced measured peak); '4MB', '1.5GiB',
    '1000000' -> bytes."""
    t = text.strip().lower()
    if t in ("none", "", "inf"):
        return None
    if t.endswith("%"):
        if reference is None:
            raise ValueError(f"budget '{text}' is relative; no unsliced peak to take it of")
        try:
            share = float(t[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share:
            raise ValueError(f"cannot read memory budget '{text}': a percentage must be positive")
        return max(1, int(share / 100 * reference))
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*([kmg]i?b|b)?", t)
    value = int(float(m.group(1)) * _UNITS[m.group(2) or ""]) if m else 0
    if value < 1:
        raise ValueError(f"cannot read memory budget '{text}': use none, a percentage (25%) or a positive "
                         f"number of bytes (4MB, 1.5GiB, 1000000)")
    return value


def _call(fn, x, y, v):
    return fn(x, y, v) if v is not None else fn(x, y)


def derivative_flops(model, x, y, loss, quantity, **kw) -> tuple[int, int]:
    """(FLOPs of the whole program, FLOPs beyond the forward pass) for one quantity."""
    fn = hogc_compile(model, quantity, loss, **kw)
    _call(fn, x, y, _vector(model, quantity))
    total = fn.explain().total_flops
    return total, total - _forward_flops(model, x, y, loss)


def _forward_flops(model, x, y, loss) -> int:
    """FLOPs of the forward pass and loss alone (subtracted to get a derivative's own FLOPs)."""
    fwd = hogc_compile(model, "loss", loss)
    fwd(x, y)
    return fwd.explain().total_flops


def _vector(model, quantity):
    if not get_quantity(quantity).takes_vector:
        return None
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
            for k, p in model.named_parameters() if p.requires_grad}


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):  # Kronecker factors
        return [t for v in result for t in _flat(v)]
    return [t for v in result.values() for t in _flat(v)]


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_schedules(model, x, y, loss, quantity: str, strategies, budgets, repeat: int = 5,
                  progress: bool = True) -> list[ScheduleRow]:
    """Compile ``quantity`` once per (strategy, budget), check every result against the first,
    and measure FLOPs, predicted and measured peak and median time. Relative budgets ('25%') are
    taken of the unsliced measured peak of the same strategy. A budget that cannot be met gives a
    row with ``error`` set (the smallest reachable peak)."""
    v = _vector(model, quantity)
    fwd_flops = _forward_flops(model, x, y, loss)
    device = x.device.type
    rows: list[ScheduleRow] = []
    ref = None
    total = len(strategies) * len(budgets)
    step = 0
    for strategy in strategies:
        unsliced = None
        for budget in budgets:
            if progress:
                _progress(step, total, f"{strategy}, budget {budget}")
            step += 1
            if unsliced is None and budget.strip().lower() not in ("none", "", "inf"):
                base = hogc_compile(model, quantity, loss, optimize=strategy, seed=0)
                _call(base, x, y, v)
                unsliced = peak_memory(lambda: _call(base, x, y, v), device)
            nbytes = parse_budget(budget, unsliced)
            row = ScheduleRow(strategy, budget, nbytes)
            try:
                fn = hogc_compile(model, quantity, loss, optimize=strategy, memory_budget=nbytes, seed=0)
                out = _call(fn, x, y, v)
            except MemoryBudgetError as e:
                row.error = str(e)
                rows.append(row)
                continue
            ex = fn.explain()
            row.flops = ex.total_flops
            row.derivative_flops = row.flops - fwd_flops
            row.slices = sum(n.slices for n in ex.networks if n.slices > 1) or 1
            row.predicted_peak = ex.predicted_peak
            row.measured_peak = peak_memory(lambda: _call(fn, x, y, v), device)
            if nbytes is None and unsliced is None:
                unsliced = row.measured_peak
            row.time = median_time(lambda: _call(fn, x, y, v), repeat)
            flat = _flat(out)
            if ref is None:
                ref = flat
            row.max_diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                               for a, b in zip(flat, ref))
            rows.append(row)
    if progress:
        _progress(total, total, "done")
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown_table(rows: list[ScheduleRow], title: str = "") -> str:
    base = next((r for r in rows if not r.error), None)
    lines = [title, ""] if title else []
    lines += ["| optimize | budget | FLOPs | derivative FLOPs | slices | predicted peak MiB | measured peak MiB "
              "| median ms | time / first | max rel. diff |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        budget = r.budget if r.budget_bytes is None else f"{r.budget} ({_mib(r.budget_bytes)} MiB)"
        if r.error:
            reach = re.search(r"at least (\d+) bytes", r.error)
            why = f"cannot be met (needs at least {_mib(int(reach.group(1)))} MiB)" if reach else r.error
            lines.append(f"| {r.strategy} | {budget} | {why} | | | | | | | |")
            continue
        lines.append(f"| {r.strategy} | {budget} | {r.flops:.3g} | {r.derivative_flops:.3g} | {r.slices} | "
                     f"{_mib(r.predicted_peak)} | {_mib(r.measured_peak)} | {r.time * 1e3:.2f} | "
                     f"{r.time / base.time:.2f} | {r.max_diff:.1e} |")
    return "\n".join(lines)


def plot_rows(rows: list[ScheduleRow], path: str, title: str = "") -> bool:
    """Time and measured peak against strategy (unsliced) and against budget (per strategy).
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if not r.error]
    strategies = list(dict.fromkeys(r.strategy for r in ok))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    plain = {r.strategy: r for r in ok if r.budget_bytes is None}
    names = [s for s in strategies if s in plain]
    axes[0][0].bar(names, [plain[s].time * 1e3 for s in names])
    axes[0][0].set_ylabel("median time (ms)")
    axes[0][0].set_title("no budget: time per strategy")
    axes[1][0].bar(names, [plain[s].measured_peak / 2**20 for s in names], label="measured")
    axes[1][0].plot(names, [plain[s].predicted_peak / 2**20 for s in names], "k_", markersize=30,
                    label="predicted")
    axes[1][0].set_ylabel("peak memory (MiB)")
    axes[1][0].legend()
    for s in strategies:
        pts = sorted((r for r in ok if r.strategy == s and r.budget_bytes is not None),
                     key=lambda r: r.budget_bytes)
        if not pts:
            continue
        xs = [r.budget_bytes / 2**20 for r in pts]
        axes[0][1].plot(xs, [r.time * 1e3 for r in pts], "o-", label=s)
        axes[1][1].plot(xs, [r.measured_peak / 2**20 for r in pts], "o-", label=f"{s} measured")
        axes[1][1].plot(xs, [r.predicted_peak / 2**20 for r in pts], "x--", label=f"{s} predicted")
    if axes[1][1].lines:
        lim = max(max(ln.get_xdata()) for ln in axes[1][1].lines)
        axes[1][1].plot([0, lim], [0, lim], ":", color="grey", label="budget")
    axes[0][1].set_title("time against memory budget")
    axes[0][1].set_xlabel("budget (MiB)")
    axes[0][1].set_ylabel("median time (ms)")
    axes[1][1].set_xlabel("budget (MiB)")
    axes[1][1].set_ylabel("peak memory (MiB)")
    for ax in (axes[0][1], axes[1][1]):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
