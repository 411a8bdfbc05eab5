"""hogc's errors: one base class, one subclass per kind of problem."""
from __future__ import annotations

__all__ = [
    "HogcError", "UnsupportedOpError", "MissingRuleError", "UnknownQuantityError",
    "TargetShapeError", "TraceError", "InputDtypeError", "VerificationError",
    "UnsupportedLossError", "SampleMixingError", "MemoryBudgetError",
]


class HogcError(Exception):
    """Base class of every error hogc raises on purpose."""


class UnsupportedOpError(HogcError):
    """The model uses an op the capture cannot lower into the IR."""


class MissingRuleError(HogcError):
    """A derivative pass met an op without a rule of the order it needs."""


class UnknownQuantityError(HogcError, KeyError):
    """A quantity name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TargetShapeError(HogcError, ValueError):
    """The target does not fit the loss and the model output."""


class TraceError(HogcError):
    """torch.fx could not trace the model (e.g. data-dependent control flow)."""


class InputDtypeError(HogcError, TypeError):
    """An input has a dtype hogc cannot differentiate through."""


class VerificationError(HogcError):
    """The IR verifier rejected a program (a bug in a pass or a hand-built IR)."""


class UnsupportedLossError(HogcError):
    """A loss function without a known loss-Hessian factorization."""


class SampleMixingError(HogcError):
    """An op couples samples, so per-sample quantities are undefined."""


class MemoryBudgetError(HogcError):
    """No slicing of the contractions brings the predicted peak memory under ``memory_budget``."""
