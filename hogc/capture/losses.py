"""Loss modules hogc knows exactly: their value, gradient and symmetric Hessian square root."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import TargetShapeError, UnsupportedLossError
from ..ir import LossSpec

__all__ = ["loss_spec", "check_target", "check_class_range", "num_columns", "SUPPORTED_LOSSES"]

SUPPORTED_LOSSES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse",
                    nn.BCEWithLogitsLoss: "bce_with_logits"}


def loss_spec(loss: nn.Module) -> LossSpec:
    kind = SUPPORTED_LOSSES.get(type(loss))
    if kind is None:
        names = ", ".join(c.__name__ for c in SUPPORTED_LOSSES)
        raise UnsupportedLossError(f"loss {type(loss).__name__} has no known Hessian factorization; "
                                   f"supported: {names}")
    if loss.reduction not in ("mean", "sum"):
        raise UnsupportedLossError(f"{type(loss).__name__}(reduction='{loss.reduction}'): use 'mean' or "
                                   f"'sum' (per-sample losses are the batch_* quantities)")
    if kind == "cross_entropy":
        if loss.weight is not None:
            raise UnsupportedLossError("CrossEntropyLoss with class weights is not supported yet")
        return LossSpec(kind, loss.reduction, int(loss.ignore_index), float(loss.label_smoothing))
    if kind == "bce_with_logits" and (loss.weight is not None or loss.pos_weight is not None):
        raise UnsupportedLossError("BCEWithLogitsLoss with weight or pos_weight is not supported yet")
    return LossSpec(kind, loss.reduction)


def check_target(spec: LossSpec, out_shape: tuple[int, ...], y: torch.Tensor) -> None:
    """Raise :class:`TargetShapeError` if ``y`` does not fit the loss for output ``out_shape``."""
    if not isinstance(y, torch.Tensor):
        raise TargetShapeError(f"target must be a tensor, got {type(y).__name__}")
    if spec.kind == "cross_entropy":
        if len(out_shape) < 2:
            raise TargetShapeError(f"CrossEntropyLoss needs model output (N, C) or (N, C, d1, ...), got "
                                   f"{tuple(out_shape)}")
        if y.is_floating_point():
            raise TargetShapeError("CrossEntropyLoss target must hold class indices (integer dtype); "
                                   f"got {y.dtype} (class probabilities are not supported yet)")
        if y.dtype != torch.long:
            raise TargetShapeError(f"CrossEntropyLoss class indices must be torch.long (int64), got {y.dtype}: "
                                   f"pass y.long()")
        want = out_shape[:1] + tuple(out_shape[2:])
        if tuple(y.shape) != want:
            raise TargetShapeError(f"CrossEntropyLoss target shape {tuple(y.shape)} does not fit model "
                                   f"output {tuple(out_shape)}: expected {want} class indices")
    else:
        if tuple(y.shape) != tuple(out_shape):
            raise TargetShapeError(f"{spec.kind} target shape {tuple(y.shape)} != model output shape "
                                   f"{tuple(out_shape)}")
        if not y.is_floating_point():
            raise TargetShapeError(f"{spec.kind} target must be floating point, got {y.dtype}")


def num_columns(spec: LossSpec, out_shape: tuple[int, ...], full: bool = False) -> int:
    """Number of columns of the exact loss-Hessian square root: the output size per sample (for
    cross-entropy over extra positions, per position: the Hessian is block-diagonal over them).
    Cross-entropy's Hessian ``diag(p) - p p^T`` has rank C - 1 (``p`` is in its null space), so its
    factor has C - 1 columns per position, one backward pass fewer than BackPACK's C; ``full``
    asks for BackPACK's C columns (the ``sqrt_ggn`` quantity's layout)."""
    size = math.prod(out_shape[1:])
    if spec.kind == "cross_entropy" and not full and out_shape[1] > 1:
        return size // out_shape[1] * (out_shape[1] - 1)
    return size


def check_class_range(y: torch.Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Class indices must lie in [0, C) (or equal ``ignore_index``): checked on every call."""
    if not y.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(y))  # one reduction, one device sync
    if (lo < 0 or hi >= num_classes) and ignore_index in (lo, hi):  # ignored targets: look again without them
        y = y[y != ignore_index]
        if not y.numel():
            return
        lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or hi >= num_classes:
        raise TargetShapeError(f"CrossEntropyLoss class indices must lie in [0, {num_classes}); got values in "
                               f"[{lo}, {hi}]")
