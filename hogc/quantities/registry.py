"""The quantity registry: names users ask for, mapped to builders of derivative graphs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import UnknownQuantityError

if TYPE_CHECKING:
    from ..ir import Node
    from .builder import DerivativeBuilder

__all__ = ["Quantity", "QUANTITIES", "register_quantity", "get_quantity", "MAX_ELEMENTS"]


@dataclass(frozen=True)
class Quantity:
    name: str
    build: Callable[["DerivativeBuilder"], "Node | dict[str, Node]"]
    per_param: bool  # result keyed by parameter name
    doc: str
    takes_vector: bool = False  # the compiled function takes a vector v (dict keyed like the parameters)
    per_sample: bool = False  # built from per-sample terms: undefined where the model couples samples


QUANTITIES: dict[str, Quantity] = {}
#: the largest dense result or intermediate (elements) a quantity may need before hogc refuses it
MAX_ELEMENTS = 2**28


def register_quantity(name: str, *, per_param: bool = True, takes_vector: bool = False, per_sample: bool = False):
    def deco(fn):
        if name in QUANTITIES:
            raise ValueError(f"quantity '{name}' is already registered")
        QUANTITIES[name] = Quantity(name, fn, per_param, (fn.__doc__ or "").strip(), takes_vector, per_sample)
        return fn
    return deco


def get_quantity(name: str) -> Quantity:
    if name not in QUANTITIES:
        raise UnknownQuantityError(f"unknown quantity '{name}'; valid quantities: {', '.join(QUANTITIES)}")
    return QUANTITIES[name]
