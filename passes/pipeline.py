"""Pass pipelines: visible lists of named passes, with the verifier after each when enabled."""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

from hogc.emit.memory import predicted_peak
from hogc.errors import MemoryBudgetError
from hogc.ir import Program, verify

from .blocking import block_squares
from .fuse import fuse_einsums
from .kernels import fuse_square_products
from .paths import contract_pairwise

__all__ = ["run_pipeline", "optimization_pipeline", "schedule_to_budget", "VERIFY", "HEADROOM"]

#: Run the IR verifier after every pass (the test suite sets HOGC_VERIFY=1).
VERIFY = os.environ.get("HOGC_VERIFY", "0") not in ("", "0")

Pass = Callable[[Program], Program]

#: A schedule is accepted when its predicted peak is at most this share of the budget: the
#: allocator's rounding and the temporaries inside library calls are not in the memory model.
HEADROOM = 0.9


def schedule_to_budget(program: Program, strategy: str = "auto", memory_budget: int | None = None,
                       itemsize: int = 4) -> Program:
    """Contract every network pairwise along ``strategy``'s path; with a ``memory_budget`` (bytes),
    slice the networks until the predicted peak of the whole program fits.

    The cap on each network's largest intermediate halves, starting from the largest one, until
    the liveness analysis (``hogc.emit.memory.predicted_peak``) says the program fits within
    ``HEADROOM`` of the budget, or three halvings in a row bring no improvement.

    Raises:
        MemoryBudgetError: no slicing reaches the budget; says the smallest reachable peak.
    """
    plain = contract_pairwise(program, strategy, itemsize=itemsize)
    if memory_budget is None:
        return plain
    limit = HEADROOM * memory_budget
    best = (predicted_peak(plain, itemsize).peak, plain)
    # caps halve from the largest intermediate: the same sequence whatever the budget, so a budget
    # equal to the reported smallest reachable peak finds that schedule again
    cap = max((rec.largest * rec.itemsize for _, rec in plain.networks), default=0) / 2
    stale = 0
    while best[0] > limit and cap >= itemsize and stale < 3:
        trial = contract_pairwise(program, strategy, cap, itemsize)
        peak = predicted_peak(trial, itemsize).peak
        if peak < best[0]:
            best, stale = (peak, trial), 0
        else:
            stale += 1
        cap /= 2
    if best[0] > limit:
        need = int(math.ceil(best[0] / HEADROOM))
        raise MemoryBudgetError(
            f"memory_budget={memory_budget} bytes cannot be met: the smallest reachable predicted peak is "
            f"{best[0]} bytes (results and unsliceable intermediates); with {1 - HEADROOM:.0%} headroom for "
            f"allocations the model does not see, raise the budget to at least {need} bytes")
    return best[1]


def optimization_pipeline(optimize: str = "auto", memory_budget: int | None = None, itemsize: int = 4,
                          device_type: str = "cpu") -> list[Pass]:
    """fuse_einsums, schedule_to_budget, fuse_square_products, block_squares ('naive' keeps the
    operands as the passes wrote them and contracts them as written)."""
    passes = [functools.partial(fuse_einsums, merge_squares=optimize != "naive"),
              functools.partial(schedule_to_budget, strategy=optimize, memory_budget=memory_budget,
                                itemsize=itemsize)]
    if optimize != "naive":
        passes += [functools.partial(fuse_square_products, device_type=device_type, itemsize=itemsize),
                   functools.partial(block_squares, itemsize=itemsize)]
    return passes


def run_pipeline(program: Program, passes: Sequence[Pass], verify_each: bool | None = None,
                 verify_input: bool = True) -> Program:
    """Run ``passes`` in order; with verification on, check the input (unless it is provisional,
    like the captured forward before ``infer_indices``) and the result of every pass."""
    check = VERIFY if verify_each is None else verify_each
    if check and verify_input:
        verify(program)
    for p in passes:
        program = p(program)
        if check:
            verify(program)
    return program
