"""hogc: a higher-order graph compiler for PyTorch derivatives beyond the gradient."""
from __future__ import annotations

from . import passes  # the top-level passes/ folder, installed as hogc.passes
from .api import CompiledFunction, compile
from .errors import (
    HogcError, InputDtypeError, MemoryBudgetError, MissingRuleError, SampleMixingError, TargetShapeError, TraceError,
    UnknownQuantityError, UnsupportedLossError, UnsupportedOpError, VerificationError,
)
from .quantities import QUANTITIES

__version__ = "0.1.0"

__all__ = [
    "compile", "CompiledFunction", "QUANTITIES", "HogcError", "InputDtypeError", "MemoryBudgetError",
    "MissingRuleError",
    "SampleMixingError", "TargetShapeError", "TraceError", "UnknownQuantityError", "UnsupportedLossError",
    "UnsupportedOpError", "VerificationError", "passes",
]
