"""Optimizers built on hogc's derivative programs."""
from .partition import PartitionNewton, cubic_step, newton_step

__all__ = ["PartitionNewton", "newton_step", "cubic_step"]
