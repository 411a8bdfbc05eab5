"""Wall-clock timing shared by the demo and the benchmarks (never used in tests)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["median_time"]


def median_time(fn: Callable[[], object], repeat: int = 10, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
