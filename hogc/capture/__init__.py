"""Capture: trace a model with torch.fx and lower it into hogc's IR."""
from __future__ import annotations

from torch import nn

from ..errors import InputDtypeError
from ..ir import Program
from .lower import lower_graph
from .trace import trace_model

__all__ = ["capture"]


def capture(model: nn.Module, x) -> Program:
    """The forward program ``{"output": model(x)}`` with provisional indices (run ``infer_indices``
    next). Trainable parameters are INPUT nodes of role "param", frozen ones and buffers "buffer"."""
    named = dict(model.named_parameters())
    for k, p in named.items():
        if not p.is_floating_point():
            raise InputDtypeError(f"parameter '{k}' has dtype {p.dtype}; hogc needs floating point")
        if x.is_floating_point() and p.dtype != x.dtype:
            raise InputDtypeError(f"x has dtype {x.dtype} but parameter '{k}' has dtype {p.dtype}; convert one "
                                  f"(e.g. model.to({x.dtype}) or x.to({p.dtype}))")
    trainable = {k for k, p in named.items() if p.requires_grad}
    gm = trace_model(model, x)
    out, _, _ = lower_graph(gm, list(named), trainable, [k for k, _ in model.named_buffers()])
    return Program.of({"output": out})
