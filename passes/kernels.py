"""fuse_square_products: sums of squares of a product as one fused kernel, where the cost model says so.

``sum V^2`` with ``V = A . B`` (GGN diagonals, per-sample norms, sums of squared per-sample
gradients) is a GEMM that writes V and a reduction that reads it back. The fused kernel
(``hogc.emit.square_kernel``, Triton) squares each tile of V in registers instead. It wins when
V's memory traffic costs more than the FLOPs the kernel loses to a vendor GEMM: short
contractions (small K) and enough tiles to fill the device. This pass estimates both times with
a roofline model of the device (``DEVICE_MODELS``) and rewrites a match into one
``SQUARE_PRODUCT`` node only when the fused estimate is lower; the estimates are in the node for
``fn.explain()``.

``SQUARE_KERNEL`` (environment ``HOGC_SQUARE_KERNEL``) sets the policy: ``'auto'`` (the cost
model, on devices where Triton compiles: CUDA), ``'always'`` (every match where Triton runs,
the CPU included through ``TRITON_INTERPRET=1``: for tests and research), ``'never'``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from hogc.emit.square_kernel import TILE, equations, square_problem, triton_available
from hogc.errors import HogcError
from hogc.ir import Node, Op, Program
from hogc.ir.node import Einsum

from .blocking import squared_product
from .paths import letter_sizes

__all__ = ["fuse_square_products", "DeviceModel", "DEVICE_MODELS", "SQUARE_KERNEL", "POLICIES", "fused_estimate",
           "choose_fused", "MIN_ELEMENTS"]

POLICIES = ("auto", "always", "never")
SQUARE_KERNEL = os.environ.get("HOGC_SQUARE_KERNEL", "auto")

#: products smaller than this stay library calls under 'auto': launch overhead decides there
MIN_ELEMENTS = 2**20


@dataclass(frozen=True)
class DeviceModel:
    gemm_flops: float  # FLOP/s of the vendor GEMM (float32, no TF32)
    bandwidth: float  # bytes/s of device memory
    fused_share: float  # share of gemm_flops the Triton tile loop reaches when the device is full
    slots: int  # programs in flight that fill the device (streaming multiprocessors x 2)


#: Roofline constants. CUDA: an H100-class part (67 TFLOP/s float32, 3.35 TB/s, 132 SMs); the
#: decision rests on the ratio of FLOPs to bytes, about 20 on A100 and H100 alike.
DEVICE_MODELS = {"cuda": DeviceModel(60e12, 3.0e12, 0.5, 264)}


def fused_estimate(problem, itemsize: int, model: DeviceModel) -> tuple[float, float]:
    """(seconds with the fused kernel, seconds as GEMM + square) for a canonical square problem."""
    GK, GR, LM, LN, R, C, K = problem.groups
    V = problem.product_elements
    flops = 2.0 * V * K
    a_bytes, b_bytes = GK * GR * LM * R * K * itemsize, GK * GR * LN * K * C * itemsize
    tiles_r, tiles_c = -(-R // TILE[0]), -(-C // TILE[1])
    fill = min(1.0, GK * tiles_r * tiles_c / model.slots)
    fused = flops / (model.gemm_flops * model.fused_share * fill) + \
        (a_bytes * tiles_c + b_bytes * tiles_r) / model.bandwidth
    unfused = flops / model.gemm_flops + (a_bytes + b_bytes + 2 * V * itemsize) / model.bandwidth
    return fused, unfused


def choose_fused(problem, itemsize: int, device_type: str) -> tuple[bool, str]:
    """(whether the cost model picks the fused kernel, why) for a canonical square problem."""
    if problem.product_elements < MIN_ELEMENTS:
        return False, f"product of {problem.product_elements} elements: below {MIN_ELEMENTS}, launch overhead decides"
    fused, unfused = fused_estimate(problem, itemsize, DEVICE_MODELS[device_type])
    return fused < unfused, f"predicted {fused * 1e3:.3g} ms fused vs {unfused * 1e3:.3g} ms GEMM + square"


def _fused(node: Node, V: Node, policy: str, device_type: str, itemsize: int) -> Node | None:
    product, square = V.arg, node.arg
    prod, sq = equations(product, square)
    problem = square_problem(prod, sq, letter_sizes(prod.split("->")[0].split(","), (x.shape for x in V.src))) \
        if prod else None
    if problem is None:
        return None
    pick, why = (True, "policy 'always'") if policy == "always" else choose_fused(problem, itemsize, device_type)
    if not pick:
        return None
    to_v = dict(zip(square.inputs[0], product.output))
    eq_sq = Einsum((product.output, product.output), "".join(to_v[c] for c in square.output), square.metric)
    return Node(Op.SQUARE_PRODUCT, V.src, (product, eq_sq, why), node.indices)


def fuse_square_products(program: Program, device_type: str = "cpu", itemsize: int = 4,
                         policy: str | None = None) -> Program:
    """Rewrite each ``sum (A . B)^2`` the policy and cost model pick into one SQUARE_PRODUCT node."""
    policy = SQUARE_KERNEL if policy is None else policy
    if policy not in POLICIES:
        raise HogcError(f"unknown square-kernel policy {policy!r} (HOGC_SQUARE_KERNEL); one of {POLICIES}")
    usable = triton_available(device_type)
    if policy == "never" or (policy == "auto" and (device_type not in DEVICE_MODELS or not usable)):
        return program
    if not usable:
        raise HogcError(f"HOGC_SQUARE_KERNEL='always' but Triton cannot run on {device_type}: install triton and "
                        f"use a CUDA device, or set TRITON_INTERPRET=1 (the CPU interpreter, for tests)")
    uses = program.use_counts()
    new: dict[int, Node] = {}
    changed = False
    for node in program.nodes:
        src = tuple(new[s.uid] for s in node.src)
        V = squared_product(node, uses) if src == node.src else None
        fused = _fused(node, V, policy, device_type, itemsize) if V is not None else None
        if fused is not None:
            new[node.uid], changed = fused, True
        else:
            new[node.uid] = node if src == node.src else node.replace(src=src)
    if not changed:
        return program
    nets = [(new.get(n.uid, n), rec) for n, rec in program.networks]
    return Program.of({key: new[v.uid] for key, v in program.outputs.items()}).with_networks(nets)
