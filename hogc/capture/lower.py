"""Lower a traced fx graph into hogc's IR by walking it once and applying the ATen table.

Indices are provisional here (sample axis known, variances not yet); the
``infer_indices`` pass assigns spaces and variances afterwards.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from ..errors import InputDtypeError, UnsupportedOpError
from ..ir import SAMPLE, Index, Node, Op, Variance, Where, build as B, topological_order
from ..ir.node import provenance
from .aten import FACTORIES, IDENTITY, LOWERINGS, VIEW_OPS, fresh_indices, supported_ops

__all__ = ["lower_graph", "LOWERINGS", "IDENTITY", "supported_ops"]


def _location(node: torch.fx.Node) -> Where:
    from .trace import source_line
    return Where(node.meta.get("hogc_module", ""), source_line(node.meta.get("stack_trace")),
                 str(node.target))


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t)).split(".")[0]




def lower_graph(gm: torch.fx.GraphModule, param_names: list[str], trainable: set[str],
                buffer_names: list[str]) -> tuple[Node, dict[str, Node], Node]:
    """fx graph (placeholders: params, buffers, x) -> (model output node, params by name, x)."""
    env: dict[torch.fx.Node, object] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(param_names) + list(buffer_names) + ["x"]
    if len(placeholders) != len(names):
        raise UnsupportedOpError(f"unexpected traced signature ({len(placeholders)} inputs)")
    params: dict[str, Node] = {}
    x_node = None
    for ph, name in zip(placeholders, names):
        shape = tuple(ph.meta["val"].shape)
        if name == "x":
            integer_x = not ph.meta["val"].is_floating_point()
            x_node_dtype = ph.meta["val"].dtype
            if len(shape) == 0:
                raise InputDtypeError("input x must have a leading batch (sample) axis")
            idx = (Index("n", shape[0], SAMPLE, Variance.BATCH),) + fresh_indices(shape[1:], "x")[:]
            x_node = B.inp("data", "x", idx)
            env[ph] = x_node
        else:
            role = "param" if name in trainable else "buffer"
            node = B.inp(role, name, fresh_indices(shape, name))
            env[ph] = node
            if role == "param":
                params[name] = node

    def val(a):
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(val(v) for v in a)
        return a

    out = None
    position = {n: k for k, n in enumerate(gm.graph.nodes)}
    alias_root: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = val(node.args[0])
            out = out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out
            break
        where = _location(node)
        if node.op == "get_attr":
            t = getattr(gm, node.target)
            env[node] = B.const_tensor(t, fresh_indices(tuple(t.shape), node.name))
            continue
        name = _op_name(node)
        if name.endswith("_") and not name.startswith("_") and name[:-1] in LOWERINGS:
            _check_inplace(node, name, position, alias_root, where)
            name = name[:-1]  # SSA: the in-place op's result is a new value
        if name in VIEW_OPS and isinstance(node.args[0], torch.fx.Node):
            alias_root[node] = alias_root.get(node.args[0], node.args[0])
        args, kwargs = val(node.args), {k: val(v) for k, v in node.kwargs.items()}
        if name == "getitem":
            env[node] = args[0][args[1]]
            continue
        if name in IDENTITY:
            env[node] = args[0]
            continue
        if name in FACTORIES:
            if any(isinstance(a, Node) for a in list(args) + list(kwargs.values())):
                kw = {k: v for k, v in node.kwargs.items() if k in ("dtype", "device")}
                t = torch.zeros(node.meta["val"].shape, **kw)
                if name in ("ones_like",):
                    t = torch.ones_like(t)
                elif name == "full_like":
                    t = torch.full_like(t, node.args[1])
            else:
                t = node.target(*node.args, **node.kwargs)
            env[node] = B.const_tensor(t, fresh_indices(tuple(t.shape), node.name))
            continue
        rule = LOWERINGS.get(name)
        if rule is None:
            hint = ""
            if name in ("copy_", "fill_", "index_put_", "slice_scatter", "select_scatter", "masked_fill_"):
                hint = (" (an assignment into part of a tensor, like h[:, :2] = v or h[:, 1] = 0: build the "
                        "tensor out of place instead, e.g. with torch.cat or torch.where)")
            raise UnsupportedOpError(
                f"unsupported op '{node.target}' in {where}{hint}. hogc lowers these ATen ops: "
                f"{', '.join(supported_ops())}")
        extra = {}
        code = rule.__code__.co_varnames[: rule.__code__.co_argcount + rule.__code__.co_kwonlyargcount]
        val_meta = node.meta.get("val")
        if "out_shape" in code:
            extra["out_shape"] = tuple(val_meta.shape) if hasattr(val_meta, "shape") else None
        if "op_name" in code:
            extra["op_name"] = name
        if "site" in code:  # the call site's name in the traced graph (a random draw's stream)
            extra["site"] = node.name
        if "out_dtype" in code:
            src_meta = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            if hasattr(val_meta, "dtype") and getattr(src_meta, "dtype", val_meta.dtype) != val_meta.dtype \
                    and args[0].op is not Op.CONST:
                raise UnsupportedOpError(f"dtype conversion {src_meta.dtype} -> {val_meta.dtype} inside the model "
                                         f"in {where}: hogc runs the whole program in the input's dtype")
            extra["out_dtype"] = getattr(val_meta, "dtype", None)
        try:
            with provenance(where):
                res = rule(*args, **kwargs, **extra)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"{e} — in {where} (op '{node.target}')") from None
        if name == "detach" and any(a.op is Op.INPUT and a.arg[0] == "param"
                                    for a in _ancestors(args[0])):
            raise UnsupportedOpError(f"detach() of a value that depends on trainable parameters in {where}: "
                                     f"hogc differentiates exactly and does not stop gradients yet")
        if isinstance(res, Node):
            shp = getattr(val_meta, "shape", None)
            concrete = shp is not None and all(type(d) is int for d in shp)  # a boolean mask makes sizes symbolic
            if concrete and tuple(shp) != res.shape:
                raise UnsupportedOpError(f"internal: lowering of '{node.target}' gave shape {res.shape}, "
                                         f"torch says {tuple(shp)} (in {where})")
        env[node] = res
    if not isinstance(out, Node):
        raise UnsupportedOpError("the model must return a single tensor")
    if integer_x:
        _check_integer_uses(x_node, out, x_node_dtype)
    return out, params, x_node


_INTEGER_STRUCTURAL = (Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.INDEX)


def _check_integer_uses(x_node: Node, out: Node, dtype) -> None:
    """Integer inputs (token ids) may only be rearranged and then read by piecewise-constant
    functions (an embedding's one-hot) or serve as the indices of a gather."""
    ints = {x_node.uid}
    for n in topological_order([out]):
        hit = [k for k, s in enumerate(n.src) if s.uid in ints]
        if not hit:
            continue
        if n.op in _INTEGER_STRUCTURAL:
            ints.add(n.uid)
        elif not (n.op is Op.NONDIFF or (n.op is Op.GATHER and hit == [1])):
            raise InputDtypeError(f"input x has dtype {dtype}; hogc needs floating-point inputs to differentiate "
                                  f"through (integer/bool inputs may only index: an embedding, gather, "
                                  f"index_select)")


def _check_inplace(node: torch.fx.Node, name: str, position, alias_root, where) -> None:
    """An in-place op becomes its functional twin; refuse if a view of the mutated tensor (or the
    tensor itself) is read after the mutation, since that read would have to see the new value."""
    target = node.args[0]
    root = alias_root.get(target, target)
    group = [n for n in position if n is root or alias_root.get(n) is root]
    for member in group:
        for user in member.users:
            if user is not node and position[user] > position[node]:
                raise UnsupportedOpError(
                    f"in-place '{name}' in {where} mutates a tensor that is read afterwards through another "
                    f"view of it (fx nodes '{member.name}' -> '{user.name}'), e.g. an update of a slice "
                    f"(h[:, :2] += v) or of a tensor whose view is used later; compute the new tensor out "
                    f"of place (h = h + v, or torch.cat of the updated and unchanged parts)")


def _ancestors(node: Node) -> list[Node]:
    out, stack, seen = [node], [node], set()
    while stack:
        n = stack.pop()
        for s in n.src:
            if id(s) not in seen:
                seen.add(id(s))
                out.append(s)
                stack.append(s)
    return out
