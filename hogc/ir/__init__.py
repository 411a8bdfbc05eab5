"""hogc's IR: immutable hash-consed nodes whose tensors carry co-/contravariant indices."""
from .index import COLUMN, SAMPLE, UNIT, Index, Variance, dual
from .node import Constant, Einsum, LossSpec, Node, Where
from .ops import Op
from .printer import format_program
from .program import Program, topological_order
from .verify import verify

__all__ = [
    "COLUMN", "SAMPLE", "UNIT", "Index", "Variance", "dual", "Constant", "Einsum", "LossSpec",
    "Node", "Where", "Op", "format_program", "Program", "topological_order", "verify",
]
