"""First-order quantities: the loss, its gradient and per-sample gradient statistics."""
from __future__ import annotations

from ..ir import build as B
from .builder import DerivativeBuilder, square_sum
from .registry import register_quantity


@register_quantity("loss", per_param=False)
def _loss(b: DerivativeBuilder):
    """The loss, reduction included."""
    return b.loss


@register_quantity("grad")
def _grad(b):
    """Gradient of the loss."""
    return {k: B.einsum([B.letters(p.ndim)], B.letters(p.ndim - 1, 1), [p])
            for k, p in b.per_sample_grads.items()}


@register_quantity("batch_grad", per_sample=True)
def _batch_grad(b):
    """Per-sample gradients (each sample's share of the loss; they sum to grad)."""
    return dict(b.per_sample_grads)


@register_quantity("batch_l2", per_sample=True)
def _batch_l2(b):
    """Squared l2 norm of each per-sample gradient, shape (N,)."""
    return {k: square_sum(p, B.letters(1), 1, metric=True) for k, p in b.per_sample_grads.items()}


@register_quantity("sum_grad_squared", per_sample=True)
def _sgs(b):
    """Sum over samples of the squared per-sample gradients."""
    return {k: square_sum(p, "", 1, metric=False) for k, p in b.per_sample_grads.items()}


@register_quantity("variance", per_sample=True)
def _variance(b):
    """mean_n (batch_grad_n)^2 - (mean_n batch_grad_n)^2, as BackPACK defines it."""
    sgs, grad = _sgs(b), _grad(b)
    out = {}
    for k in sgs:
        m = B.scale(grad[k], 1.0 / b.N)
        out[k] = B.sub(B.scale(sgs[k], 1.0 / b.N), B.mul(m, m))
    return out
