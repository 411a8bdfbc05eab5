"""Convolution networks as convolution kernels.

After fusion, a convolution (and its transpose, which the reverse mode produces) is a network
``data x weight x P_1 x ... x P_d`` with one index pattern P[h, k, o] = [h == o s + k d - p] per
spatial axis (``Constant.pattern`` holds (s, p, d)). When the data carries the pattern's input
positions h and the result its output positions o, the network is ``conv{d}d``; when the data
carries o and the result h, it is ``conv_transpose{d}d``. Extra letters of the data that the
result keeps (samples, loss-Hessian columns, tangents) fold into the kernel's batch axis. When
one operand carries h, the other o and the result the taps k, the network is a weight gradient
(``conv{d}d_weight``, torch's convolution backward): shared letters the result drops fold into
the batch axis, those it keeps (per-sample gradients) become groups, up to ``GROUPED_MAX``
result elements. Any other network with patterns (products, large per-column factors) is left
to the path search, whose selection steps make it im2col + GEMM (``passes/selection.py``).
"""
from __future__ import annotations

import math

from hogc.ir import Index, Node, Op, Variance, build as B
from hogc.ir.node import Constant, Einsum

__all__ = ["conv_network", "conv_flops", "pattern_of"]


def pattern_of(x: Node) -> tuple | None:
    """(stride, padding, dilation) of a convolution index-pattern constant P[h, k, o], else None."""
    if x.op is Op.CONST and isinstance(x.arg, Constant) and x.arg.pattern is not None and x.ndim == 3:
        return x.arg.pattern
    return None


def _axis(n: int, tag: str) -> Index:
    return Index(f"conv{tag}", n, "conv", Variance.BATCH)


def conv_network(node: Node) -> Node | None:
    """The network as CONV node(s) with its own result indices, or None if it is not one."""
    eq: Einsum = node.arg
    ops = list(node.src)
    pats = [k for k, x in enumerate(ops) if pattern_of(x) is not None]
    rest = [k for k in range(len(ops)) if k not in pats]
    if not pats or len(rest) != 2 or len(pats) > 3:
        return None
    sizes = {}
    for s, x in zip(eq.inputs, ops):
        sizes.update(zip(s, x.shape))
    unit = {c for c, n in sizes.items() if n == 1}
    specs = []
    for k in pats:
        s = eq.inputs[k]
        if len(set(s)) != 3 or any(c in unit for c in s):
            return None
        specs.append((s[0], s[1], s[2], pattern_of(ops[k])))
    H, T, O = ({sp[i] for sp in specs} for i in range(3))
    out = set(eq.output)
    if any(eq.inputs[k].count(c) > 1 for k in range(len(ops)) for c in eq.inputs[k]):
        return None
    if T <= out:
        return _weight_gradient(node, [(ops[k], eq.inputs[k]) for k in rest], specs, sizes, unit)
    for a, b in ((rest[0], rest[1]), (rest[1], rest[0])):
        w, d = eq.inputs[a], eq.inputs[b]
        if set(w) & (H | O) or not T <= set(w) or set(d) & T:
            continue
        transposed = O <= set(d) and H <= out and not H & set(d)
        forward = H <= set(d) and O <= out and not O & set(d)
        if not (forward or transposed):
            continue
        src_sp, dst_sp = ([sp[0] for sp in specs], [sp[2] for sp in specs]) if forward else \
            ([sp[2] for sp in specs], [sp[0] for sp in specs])
        summed = [c for c in d if c in w and c not in out and c not in unit]
        w_out = [c for c in w if c not in d and c in out and c not in unit]
        w_other = [c for c in w if c not in T and c not in summed and c not in w_out and c not in unit]
        batch = [c for c in d if c not in summed and c not in src_sp and c not in unit]
        if len(summed) != 1 or len(w_out) != 1 or w_other or any(c not in out or c in w for c in batch):
            continue
        if set(eq.output) - set(batch) - set(w_out) - set(dst_sp) - unit:
            continue
        return _build(node, ops[b], d, ops[a], w, specs, batch, summed[0], w_out[0], src_sp, dst_sp,
                      transposed, sizes)
    return None


def _build(node, x, d, w, ws, specs, batch, cin, cout, src_sp, dst_sp, transposed, sizes) -> Node | None:
    eq: Einsum = node.arg
    nb = math.prod(sizes[c] for c in batch)
    # data -> (batch, cin, *spatial); weight -> (cin, cout, *taps) transposed, (cout, cin, *taps) forward
    xd = _arranged(x, d, sizes, batch + [cin] + src_sp, (nb, sizes[cin]) + tuple(sizes[c] for c in src_sp), "")
    taps = [sp[1] for sp in specs]
    order = ([cin, cout] if transposed else [cout, cin]) + taps
    wl = _letters(ws, sizes)
    wk = B.permute(_squeezed(w, ws, sizes), [wl.index(c) for c in order])
    stride, padding, dilation = _geometry(specs)
    out_pad = []
    for sp, src, dst in zip(specs, src_sp, dst_sp):
        s, p, dl = sp[3]
        k = sizes[sp[1]]
        if transposed:
            base = (sizes[src] - 1) * s - 2 * p + dl * (k - 1) + 1
            op = sizes[dst] - base
            if not 0 <= op < max(s, dl):
                return None
            out_pad.append(op)
        else:
            if (sizes[src] + 2 * p - dl * (k - 1) - 1) // s + 1 != sizes[dst]:
                return None
            out_pad.append(0)
    shape = (nb, sizes[cout]) + tuple(sizes[c] for c in dst_sp)
    y = Node(Op.CONV, (xd, wk), ("transposed" if transposed else "forward", stride, padding, dilation,
                                 tuple(out_pad), 1),
             tuple(_axis(n, f"y{i}") for i, n in enumerate(shape)))
    full = [c for c in batch] + [cout] + dst_sp
    y = B.reshape(y, tuple(sizes[c] for c in full), tuple(_axis(sizes[c], f"f{i}") for i, c in enumerate(full)))
    kept = [c for c in eq.output if sizes[c] != 1]
    y = B.permute(y, [full.index(c) for c in kept])
    return B.reshape(y, node.shape, node.indices)


#: Per-sample weight gradients as one grouped convolution backward only up to this many result
#: elements; larger ones (per-column GGN factors) are left to im2col + GEMM, which block_squares
#: can cut into cache-sized blocks.
GROUPED_MAX = 2**21


def _weight_gradient(node: Node, operands, specs, sizes, unit) -> Node | None:
    """``x[B, cin, h] P[h, k, o] g[B, cout, o] -> [B', cout, cin, k]`` (any order): the letters B
    summed fold into the kernel's batch axis, those kept (B', per-sample gradients) become groups."""
    eq: Einsum = node.arg
    H, T, O = ([sp[i] for sp in specs] for i in range(3))
    out = set(eq.output) - unit
    for (x, xs), (g, gs) in (operands, operands[::-1]):
        xl, gl = _letters(xs, sizes), _letters(gs, sizes)
        if not set(H) <= set(xl) or not set(O) <= set(gl) or set(xl) & set(O) or set(gl) & set(H):
            continue
        batch = [c for c in xl if c in gl]
        cin = [c for c in xl if c not in gl and c not in H]
        cout = [c for c in gl if c not in xl and c not in O]
        kept = [c for c in batch if c in out]
        summed = [c for c in batch if c not in out]
        if len(cin) != 1 or len(cout) != 1 or out != set(T) | set(cin) | set(cout) | set(kept):
            continue
        if kept and math.prod(sizes[c] for c in out) > GROUPED_MAX:
            return None
        for sp in specs:  # every output position must come from the kernel's own size formula
            s, p, dl = sp[3]
            if (sizes[sp[0]] + 2 * p - dl * (sizes[sp[1]] - 1) - 1) // s + 1 != sizes[sp[2]]:
                return None
        ns, nk = math.prod(sizes[c] for c in summed), math.prod(sizes[c] for c in kept)

        def flat(v, vs, chans, sp, tag):
            shape = (ns, nk * sizes[chans[0]]) + tuple(sizes[c] for c in sp)
            return _arranged(v, vs, sizes, summed + kept + chans + sp, shape, tag)

        xd, gd = flat(x, xs, cin, H, "x"), flat(g, gs, cout, O, "g")
        taps = tuple(sizes[c] for c in T)  # the fifth slot: kernel size (output_padding of the other kinds)
        stride, padding, dilation = _geometry(specs)
        shape = (nk * sizes[cout[0]], sizes[cin[0]]) + taps
        y = Node(Op.CONV, (xd, gd), ("weight", stride, padding, dilation, taps, nk),
                 tuple(_axis(n, f"w{i}") for i, n in enumerate(shape)))
        full = kept + cout + cin + T
        y = B.reshape(y, tuple(sizes[c] for c in full), tuple(_axis(sizes[c], f"v{i}") for i, c in enumerate(full)))
        y = B.permute(y, [full.index(c) for c in eq.output if sizes[c] != 1])
        return B.reshape(y, node.shape, node.indices)
    return None


def _geometry(specs) -> tuple[tuple[int, ...], ...]:
    """(stride, padding, dilation), one entry per spatial axis, from the patterns' specs."""
    return tuple(tuple(sp[3][i] for sp in specs) for i in range(3))


def _arranged(v: Node, vs: str, sizes, order: list[str], shape: tuple[int, ...], tag: str) -> Node:
    """Operand v (letters vs) with its letters in ``order``, reshaped to the kernel's ``shape``."""
    v = B.permute(_squeezed(v, vs, sizes), [_letters(vs, sizes).index(c) for c in order])
    return B.reshape(v, shape, tuple(_axis(n, f"{tag}{i}") for i, n in enumerate(shape)))


def _letters(s: str, sizes) -> str:
    return "".join(c for c in s if sizes[c] != 1)


def _squeezed(x: Node, s: str, sizes) -> Node:
    keep = [k for k, c in enumerate(s) if sizes[c] != 1]
    if len(keep) == x.ndim:
        return x
    return B.reshape(x, tuple(x.shape[k] for k in keep), tuple(x.indices[k] for k in keep))


def conv_flops(y: Node) -> int:
    """Multiply-adds (x2) of a CONV node: every output element sums cin x taps products."""
    x, w = y.src
    if y.arg[0] == "weight":  # every weight entry sums batch x output positions products
        return 2 * math.prod(y.shape) * w.shape[0] * math.prod(w.shape[2:])
    if y.arg[0] == "transposed":  # each input element scatters cout x taps products
        return 2 * math.prod(x.shape) * math.prod(w.shape) // w.shape[0]
    return 2 * math.prod(y.shape) * math.prod(w.shape) // w.shape[0]
