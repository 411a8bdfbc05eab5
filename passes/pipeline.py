"""Pass pipelines: visible lists of named passes, with the verifier after each when enabled."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

from hogc.ir import Program, verify

from .fuse import fuse_einsums
from .paths import contract_pairwise

__all__ = ["run_pipeline", "optimization_pipeline", "VERIFY"]

#: Run the IR verifier after every pass (the test suite sets HOGC_VERIFY=1).
VERIFY = os.environ.get("HOGC_VERIFY", "0") not in ("", "0")

Pass = Callable[[Program], Program]


def optimization_pipeline(optimize: str = "auto") -> list[Pass]:
    return [fuse_einsums, functools.partial(contract_pairwise, strategy=optimize)]


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
