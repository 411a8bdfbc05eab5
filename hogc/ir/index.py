"""Tensor indices: name, size, vector space and variance.

An activation ``x^i`` carries an upper (contravariant) index, a gradient ``g_i`` a lower
(covariant) one; sample and column axes are batch indices. Derivatives flip variance.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

__all__ = ["Variance", "Index", "SAMPLE", "COLUMN", "UNIT", "dual", "fmt_indices"]


class Variance(Enum):
    UP = "^"  # contravariant: components of a vector (activations, parameters)
    LOW = "_"  # covariant: components of a covector (gradients)
    BATCH = "."  # a batch axis (samples, columns of a square root, size-1 broadcast axes)

    def flip(self) -> "Variance":
        return {Variance.UP: Variance.LOW, Variance.LOW: Variance.UP}.get(self, self)


#: Reserved spaces.
SAMPLE = "sample"
COLUMN = "column"
UNIT = "unit"  # size-1 axes


@dataclass(frozen=True)
class Index:
    """One axis of an IR tensor."""

    name: str
    size: int
    space: str
    variance: Variance

    def dual(self) -> "Index":
        return replace(self, variance=self.variance.flip())

    def __str__(self) -> str:
        return f"{self.name}{self.variance.value}{self.size}"

    @property
    def is_batch(self) -> bool:
        return self.variance is Variance.BATCH


def dual(indices: tuple[Index, ...]) -> tuple[Index, ...]:
    return tuple(i.dual() for i in indices)


def unit() -> Index:
    return Index("1", 1, UNIT, Variance.BATCH)


def fmt_indices(indices: tuple[Index, ...]) -> str:
    return "(" + " ".join(str(i) for i in indices) + ")"
