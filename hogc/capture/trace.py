"""Trace a model with torch.fx's make_fx (pre-dispatch ATen ops), parameters as inputs.

Fake tensors make data-dependent control flow fail loudly instead of silently
specializing on one batch. Global module hooks record the module path of every node.
"""
from __future__ import annotations

import os
import re
import traceback

import torch
from torch import nn
from torch.func import functional_call
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import TraceError

__all__ = ["trace_model", "source_line"]

#: frames inside these folders are not the user's code
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep,
                 os.path.dirname(os.path.dirname(os.path.dirname(__file__))) + os.sep + "passes" + os.sep)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(stack_trace: str | None) -> str:
    """The innermost frame of the user's code (not torch's) as ``file.py:12 `code```."""
    if not stack_trace:
        return ""
    frames = [m for m in _FRAME.finditer(stack_trace) if not m.group(1).startswith(_LIBRARY_DIRS)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{os.path.basename(f.group(1))}:{f.group(2)} `{f.group(4).strip()}`"


class _ModulePaths:
    """Global forward hooks labelling each new fx node with the innermost module path."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack = [""]
        self.seen = 0
        self.handles = []

    def flush(self) -> None:
        tracer = proxy_tensor._CURRENT_MAKE_FX_TRACER
        if tracer is None or getattr(tracer, "fx_tracer", None) is None:
            return
        nodes = tracer.fx_tracer.graph.nodes
        if len(nodes) > self.seen:
            for n in list(nodes)[self.seen:]:
                n.meta.setdefault("hogc_module", self.stack[-1])
            self.seen = len(nodes)

    def __enter__(self):
        def pre(mod, args):
            self.flush()
            self.stack.append(self.names.get(id(mod), self.stack[-1]))

        def post(mod, args, out):
            self.flush()
            self.stack.pop()

        self.handles = [nn.modules.module.register_module_forward_pre_hook(pre),
                        nn.modules.module.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        self.flush()
        for h in self.handles:
            h.remove()


def trace_model(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """Trace ``model(x)`` into an fx graph whose placeholders are (params..., buffers..., x)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def f(p, b, inp):
        return functional_call(model, (p, b), (inp,))

    paths = _ModulePaths(model)
    # functional_call writes the wrong (fake) tensors back when a module is registered under two
    # names; restore every module's own tensors whatever happens
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        with paths:
            gm = make_fx(f, tracing_mode="fake", pre_dispatch=True, record_stack_traces=True,
                         _allow_non_fake_inputs=True)(params, buffers, x)
    except Exception as e:  # noqa: BLE001 - every tracing failure becomes a hogc error
        msg = str(e).split("\n")[0]
        data_dep = "data-dependent" in str(e) or "DataDependent" in type(e).__name__ or \
            "GuardOnDataDependent" in type(e).__name__
        hint = ("the model has data-dependent control flow (a Python branch or loop on tensor "
                "values); hogc traces one program for all inputs of a shape, so rewrite the branch "
                "with torch.where or move it out of the model") if data_dep else \
            "torch.fx could not trace the model"
        where = source_line("".join(traceback.format_tb(e.__traceback__)))
        raise TraceError(f"{hint}: {type(e).__name__}: {msg}" + (f" (at {where})" if where else "")) from e
    finally:
        for m, p, b in saved:
            m._parameters.update(p)
            m._buffers.update(b)
    for node in gm.graph.nodes:
        if "hogc_module" not in node.meta:
            node.meta["hogc_module"] = ""
    return gm
