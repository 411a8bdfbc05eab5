"""Per-subset learning rates from partition-level derivatives (Wolinski, arXiv 2312.03885).

With the parameters split into S subsets and u the gradient, one step is theta_s <- theta_s -
eta_s g_s. The loss along these S directions is the polynomial
phi(eta) = L - gbar^T eta + eta^T Hbar eta / 2 - Dbar[eta, eta, eta] / 6 + ...
(``partition_grad``, ``partition_hessian``, ``partition_d3_diag`` of hogc). Order 2 takes
eta = Hbar^-1 gbar; order 3 the anisotropic Nesterov cubic-regularized step
argmin -gbar^T eta + eta^T Hbar eta / 2 + lam / 6 |D eta|^3 with D = Diag(|Dbar_sss|^(1/3)),
found by a scalar root search on r = |D eta|. Rates are recomputed every ``every`` steps,
averaged (``beta``) and clipped at zero.
"""
from __future__ import annotations

import torch
from torch import nn

from ..api import compile as hogc_compile, resolve_partition
from ..errors import HogcError

__all__ = ["PartitionNewton", "newton_step", "cubic_step"]


def newton_step(g: torch.Tensor, H: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """eta = (H + damping I)^-1 g (least squares where singular)."""
    A = H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.lstsq(A, g.unsqueeze(1)).solution.squeeze(1)


def cubic_step(g: torch.Tensor, H: torch.Tensor, d: torch.Tensor, lam: float = 1.0, iters: int = 100) -> torch.Tensor:
    """argmin_eta -g.eta + eta H eta / 2 + lam / 6 |D eta|^3, D = diag(d) > 0 where H + lam r D^2 / 2
    is positive definite: eta(r) = (H + lam r D^2 / 2)^-1 g with r = |D eta(r)|, by bisection on r."""
    if not (torch.isfinite(g).all() and torch.isfinite(H).all() and torch.isfinite(d).all()):
        raise HogcError("cubic step: the partition gradient, Hessian or D_sss is not finite")
    D2 = torch.diag(d * d)

    def eta(r):
        return torch.linalg.solve(H + 0.5 * lam * r * D2, g)

    def psd(r):
        return bool(torch.linalg.eigvalsh(H + 0.5 * lam * r * D2).min() > 0)

    lo, hi = 0.0, 1.0
    while not psd(hi) or torch.linalg.norm(d * eta(hi)) > hi:
        hi *= 2.0
        if hi > 1e30:
            raise HogcError("cubic step: no regularization makes the model convex (is some D_sss zero?)")
    if psd(lo) and torch.linalg.norm(d * eta(lo)) <= lo:
        return eta(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if psd(mid) and torch.linalg.norm(d * eta(mid)) <= mid:
            hi = mid
        else:
            lo = mid
    return eta(hi)


class PartitionNewton(torch.optim.Optimizer):
    """Per-subset learning rates from partition-level derivatives of order 2 or 3.

    Usage::

        opt = PartitionNewton(model, nn.CrossEntropyLoss(), partition="module", order=3)
        for x, y in data:
            opt.zero_grad()
            loss = loss_fn(model(x), y); loss.backward()
            opt.step(batch=(x, y))   # rates are recomputed on this batch every ``every`` steps

    Args:
        model: the model (its trainable parameters are optimized).
        loss: the loss module (as for ``hogc.compile``).
        partition: ``'module'``, ``'parameter'`` or lists of parameter names.
        order: 2 (Newton on the rates) or 3 (cubic regularization with the order-3 diagonal).
        every: recompute the rates every this many steps.
        beta: moving average of the rates (0: use the newest).
        lam: cubic regularization strength (order 3).
        damping: added to the diagonal of Hbar (order 2).
        max_rate: clip the rates to [0, max_rate].
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None = None, partition="module", order: int = 2,
                 every: int = 10, beta: float = 0.9, lam: float = 1.0, damping: float = 1e-8,
                 max_rate: float = 2.0):
        if order not in (2, 3):
            raise HogcError(f"order must be 2 or 3, got {order}")
        if every < 1 or not 0 <= beta < 1:
            raise HogcError(f"every must be >= 1 and 0 <= beta < 1, got every={every}, beta={beta}")
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], dict(order=order, every=every, beta=beta, lam=lam, damping=damping,
                                                     max_rate=max_rate))
        self.subsets = resolve_partition(model, partition)
        index = {k: p for k, p in named}
        self.groups_by_subset = [[index[k] for k in sub] for sub in self.subsets]
        qs = ("partition_grad", "partition_hessian") + (("partition_d3_diag",) if order == 3 else ())
        self.fn = hogc_compile(model, qs, loss, partition=self.subsets)
        self.order, self.every, self.beta, self.lam = order, every, beta, lam
        self.damping, self.max_rate = damping, max_rate
        self.rates: torch.Tensor | None = None
        self.steps = 0

    def compute_rates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fresh per-subset rates at the current parameters on the batch (x, y), clipped."""
        out = self.fn(x, y)
        g, H = out["partition_grad"], out["partition_hessian"]
        if self.order == 2:
            eta = newton_step(g, H, self.damping)
        else:
            d = out["partition_d3_diag"].abs().pow(1 / 3)
            eta = cubic_step(g, H, d.clamp_min(1e-12), self.lam)
        return eta.clamp(0.0, self.max_rate)

    def state_dict(self) -> dict:
        """torch's optimizer state plus the averaged rates and the step counter."""
        out = super().state_dict()
        out["partition_newton"] = {"rates": None if self.rates is None else self.rates.clone(), "steps": self.steps}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("partition_newton", {"rates": None, "steps": 0})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "partition_newton"})
        self.rates = None if extra["rates"] is None else extra["rates"].clone()
        self.steps = int(extra["steps"])

    @torch.no_grad()
    def step(self, closure=None, *, batch=None):
        """theta_s <- theta_s - eta_s grad_s; recomputes the rates on ``batch`` every ``every`` steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.steps % self.every == 0:
            if batch is None:
                raise HogcError("PartitionNewton.step needs batch=(x, y) on the steps that recompute the rates")
            fresh = self.compute_rates(*batch)
            self.rates = fresh if self.rates is None else self.beta * self.rates + (1 - self.beta) * fresh
        for rate, params in zip(self.rates.tolist(), self.groups_by_subset):
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-rate)
        self.steps += 1
        return loss
