"""The one immutable node type of hogc's IR, hash-consed: identical nodes are one object.

``Node(op, src, arg, indices)`` is the whole IR; common-subexpression elimination is free
because building the same node twice returns the same object.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any

from .index import SAMPLE, Index
from .ops import Op

__all__ = ["Node", "Einsum", "Constant", "LossSpec", "Where", "provenance"]


@dataclass(frozen=True)
class Where:
    """Provenance of a node in the user's model."""

    module: str = ""
    source: str = ""
    fx_target: str = ""

    def __str__(self) -> str:
        mod = self.module or "<top-level>"
        return f"module '{mod}'" + (f", {self.source}" if self.source else "")


@dataclass(frozen=True)
class Einsum:
    """Equation of an EINSUM node: one letter string per operand, the output string, and the
    letters contracted through the Euclidean metric (explicit, basis-dependent)."""

    inputs: tuple[str, ...]
    output: str
    metric: frozenset[str] = frozenset()

    def __str__(self) -> str:
        eq = ",".join(self.inputs) + "->" + self.output
        return eq + (f" |metric {''.join(sorted(self.metric))}" if self.metric else "")


class Constant:
    """A captured constant tensor (hashed by identity). ``delta`` marks a square identity matrix
    (a Kronecker delta): einsums eliminate it by merging its two letters."""

    __slots__ = ("tensor", "delta", "pattern", "__weakref__")

    def __init__(self, tensor, delta: bool = False, pattern: tuple | None = None):
        self.tensor = tensor
        self.delta = delta
        #: a convolution index pattern P[h, k, o] = [h == o * stride + k * dilation - padding]:
        #: (stride, padding, dilation), so scheduling can emit a convolution kernel
        self.pattern = pattern

    def __repr__(self) -> str:
        t = self.tensor
        if self.delta:
            return f"delta{tuple(t.shape)}"
        if t.numel() <= 6:
            return f"const{tuple(t.shape)}{t.tolist()}"
        return f"const{tuple(t.shape)}"


@dataclass(frozen=True)
class LossSpec:
    kind: str  # "cross_entropy" | "mse" | "bce_with_logits"
    reduction: str  # "mean" | "sum"
    ignore_index: int = -100  # cross-entropy: targets with this value contribute nothing
    label_smoothing: float = 0.0  # cross-entropy

    def __str__(self) -> str:
        extra = (f", ignore_index={self.ignore_index}" if self.ignore_index != -100 else "") + \
            (f", label_smoothing={self.label_smoothing:g}" if self.label_smoothing else "")
        return f"{self.kind}/{self.reduction}{extra}"

    def runtime_args(self) -> tuple:
        """The arguments the runtime loss helpers take after the tensors."""
        return (self.kind, self.reduction, self.ignore_index, self.label_smoothing)


_cache: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()
_ids = itertools.count()
_where_stack: list[Where | None] = [None]


@contextlib.contextmanager
def provenance(where: Where | None):
    """Nodes built inside this block without an explicit ``where`` get this one."""
    _where_stack.append(where)
    try:
        yield
    finally:
        _where_stack.pop()


class Node:
    """An IR value: ``op`` applied to ``src`` with static ``arg``; ``indices`` describe its axes."""

    __slots__ = ("op", "src", "arg", "indices", "where", "uid", "__weakref__")
    op: Op
    src: tuple["Node", ...]
    arg: Any
    indices: tuple[Index, ...]
    where: Where | None

    def __new__(cls, op: Op, src: tuple["Node", ...] = (), arg: Any = None,
                indices: tuple[Index, ...] = (), where: Where | None = None):
        src, indices = tuple(src), tuple(indices)
        key = (op, tuple(id(s) for s in src), arg, indices)
        hit = _cache.get(key)
        if hit is not None:
            return hit
        self = object.__new__(cls)
        where = where if where is not None else _where_stack[-1]
        for k, v in (("op", op), ("src", src), ("arg", arg), ("indices", indices),
                     ("where", where), ("uid", next(_ids))):
            object.__setattr__(self, k, v)
        _cache[key] = self
        return self

    def __setattr__(self, *_):
        raise AttributeError("IR nodes are immutable; build a new one with replace()")

    def replace(self, **kw) -> "Node":
        d = dict(op=self.op, src=self.src, arg=self.arg, indices=self.indices, where=self.where)
        d.update(kw)
        return Node(**d)

    # hash and eq are by identity (hash-consing makes that structural equality)
    __hash__ = object.__hash__

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(i.size for i in self.indices)

    @property
    def ndim(self) -> int:
        return len(self.indices)

    def sample_axis(self) -> int | None:
        for k, i in enumerate(self.indices):
            if i.space == SAMPLE:
                return k
        return None

    @property
    def has_sample(self) -> bool:
        return self.sample_axis() is not None

    def __repr__(self) -> str:
        return f"Node(%{self.uid} {self.op.name} {self.arg!s})"
