"""Quantities: a registry of named derivative quantities, one family per module.

``derive`` builds the derivative program for a list of names; families register themselves
on import (first_order, ggn, kronecker, hessian, partition).
"""
from __future__ import annotations

from . import first_order, ggn, hessian, kronecker, partition  # noqa: F401  (registration)
from .builder import DerivativeBuilder, derive
from .registry import MAX_ELEMENTS, QUANTITIES, Quantity, get_quantity, register_quantity

__all__ = ["Quantity", "QUANTITIES", "register_quantity", "get_quantity", "DerivativeBuilder", "derive",
           "MAX_ELEMENTS"]
