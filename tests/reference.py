"""Independent torch.func references (float64) for every quantity."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, hessian, vmap


def _loss_fn(lf: nn.Module):
    if isinstance(lf, nn.CrossEntropyLoss):
        return lambda f, y: F.cross_entropy(f, y, reduction="sum", ignore_index=lf.ignore_index,
                                            label_smoothing=lf.label_smoothing)
    if isinstance(lf, nn.MSELoss):
        return lambda f, y: F.mse_loss(f, y, reduction="sum")
    return lambda f, y: F.binary_cross_entropy_with_logits(f, y, reduction="sum")


def _scale(lf: nn.Module, out: torch.Tensor, y: torch.Tensor) -> float:
    if lf.reduction == "sum":
        return 1.0
    if isinstance(lf, nn.CrossEntropyLoss):  # torch: mean over the kept positions (all tokens/pixels)
        return 1.0 / max(int((y != lf.ignore_index).sum()), 1)
    return 1.0 / out.numel()


class Reference:
    """Quantities of ``lf(model(x), y)`` computed the textbook way with torch.func."""

    def __init__(self, model: nn.Module, lf: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.lf, self.x, self.y = model, lf, x, y
        self.params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        with torch.no_grad():
            self.out = model(x)
        self.r = _scale(lf, self.out, y)
        self.ell = _loss_fn(lf)

    def f1(self, p, xn):  # model on one sample
        return functional_call(self.model, p, (xn.unsqueeze(0),)).squeeze(0)

    def share(self, p, xn, yn):  # one sample's share of the loss
        return self.r * self.ell(self.f1(p, xn).unsqueeze(0), yn.unsqueeze(0))

    def loss(self):
        return self.lf(functional_call(self.model, self.params, (self.x,)), self.y)

    def grad(self):
        return grad(lambda p: self.lf(functional_call(self.model, p, (self.x,)), self.y))(self.params)

    def batch_grad(self):
        return vmap(grad(self.share), in_dims=(None, 0, 0))(self.params, self.x, self.y)

    def batch_l2(self):
        return {k: (v**2).reshape(v.shape[0], -1).sum(1) for k, v in self.batch_grad().items()}

    def sum_grad_squared(self):
        return {k: (v**2).sum(0) for k, v in self.batch_grad().items()}

    def variance(self):
        N = self.x.shape[0]
        g, s = self.grad(), self.sum_grad_squared()
        return {k: s[k] / N - (g[k] / N) ** 2 for k in g}

    def jacobians(self):
        """Per-sample Jacobians of the (flattened) output: {name: (N, O, *param)}."""
        J = vmap(jacrev(self.f1), in_dims=(None, 0))(self.params, self.x)
        N = self.x.shape[0]
        return {k: v.reshape(N, -1, *self.params[k].shape) for k, v in J.items()}

    def output_hessians(self):
        """Per-sample Hessians of the sample's loss share w.r.t. the flattened output: (N, O, O)."""
        def h1(fn, yn):
            shape = fn.shape
            return hessian(lambda f: self.r * self.ell(f.reshape(shape).unsqueeze(0), yn.unsqueeze(0)))(fn.flatten())
        return vmap(h1)(self.out, self.y)

    def batch_ggn_diag(self):
        J, H = self.jacobians(), self.output_hessians()
        return {k: torch.einsum("no...,nop,np...->n...", v, H, v) for k, v in J.items()}

    def ggn_diag(self):
        return {k: v.sum(0) for k, v in self.batch_ggn_diag().items()}

    def mc_diag_given(self, S: torch.Tensor):
        """GGN diagonal from given per-sample output factors S (M, N, *out)."""
        J = self.jacobians()
        Sf = S.reshape(S.shape[0], S.shape[1], -1)
        return {k: torch.einsum("mno,no...->mn...", Sf, v).pow(2).sum((0, 1)) for k, v in J.items()}

    # --- GGN matrices -------------------------------------------------------------------
    def flat_jacobian(self):
        """(N, O, D): per-sample output Jacobians, parameters flattened in model order."""
        J = self.jacobians()
        return torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in J.values()], 2)

    def ggn(self):
        J, H = self.flat_jacobian(), self.output_hessians()
        return torch.einsum("noa,nop,npb->ab", J, H, J)

    def ggn_block(self):
        J, H = self.jacobians(), self.output_hessians()
        out = {}
        for k, v in J.items():
            f = v.reshape(v.shape[0], v.shape[1], -1)
            out[k] = torch.einsum("noa,nop,npb->ab", f, H, f)
        return out

    def sqrt_ggn(self):
        """J_n^T S_n with S hogc's loss-Hessian square root (checked against the Hessian separately)."""
        from hogc.emit import runtime as R
        S = R.loss_sqrt_hessian(self.out, self.y, *self.spec())
        Sf = S.reshape(S.shape[0], S.shape[1], -1)
        return {k: torch.einsum("cno,no...->cn...", Sf, v) for k, v in self.jacobians().items()}

    def spec(self):
        kind = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce_with_logits"}
        if isinstance(self.lf, nn.CrossEntropyLoss):
            return "cross_entropy", self.lf.reduction, self.lf.ignore_index, self.lf.label_smoothing
        return kind[type(self.lf)], self.lf.reduction

    def ggnvp(self, v):
        flat = torch.cat([v[k].flatten() for k in self.params])
        g = self.ggn() @ flat
        out, s = {}, 0
        for k, p in self.params.items():
            out[k] = g[s:s + p.numel()].reshape(p.shape)
            s += p.numel()
        return out

    def ggn_eigen(self, k):
        return torch.linalg.eigvalsh(self.ggn()).flip(0)[:k]

    # --- Hessians ------------------------------------------------------------------------
    def _unflatten(self, flat):
        out, s = {}, 0
        for k, p in self.params.items():
            out[k] = flat[s:s + p.numel()].reshape(p.shape)
            s += p.numel()
        return out

    def _flat(self):
        return torch.cat([p.flatten() for p in self.params.values()])

    def hessian(self):
        return hessian(lambda f: self.lf(functional_call(self.model, self._unflatten(f), (self.x,)), self.y))(
            self._flat())

    def hessian_block(self):
        H, out, s = self.hessian(), {}, 0
        for k, p in self.params.items():
            out[k] = H[s:s + p.numel(), s:s + p.numel()]
            s += p.numel()
        return out

    def hessian_diag(self):
        return self._unflatten(self.hessian().diagonal())

    def batch_hessian_diag(self):
        flat = self._flat()
        Hn = vmap(hessian(lambda f, xn, yn: self.share(self._unflatten(f), xn, yn)), in_dims=(None, 0, 0))(
            flat, self.x, self.y)
        d = Hn.diagonal(dim1=1, dim2=2)
        out, s = {}, 0
        for k, p in self.params.items():
            out[k] = d[:, s:s + p.numel()].reshape((-1,) + tuple(p.shape))
            s += p.numel()
        return out

    def hvp(self, v):
        flat = torch.cat([v[k].flatten() for k in self.params])
        return self._unflatten(self.hessian() @ flat)


class BatchReference(Reference):
    """References for a model that couples its samples (train-mode BatchNorm): the whole batch is
    one sample, so Jacobians and output Hessians are those of the whole (flattened) output. Only
    batch quantities (per-sample ones are undefined)."""

    def jacobians(self):
        J = jacrev(lambda p: functional_call(self.model, p, (self.x,)))(self.params)
        return {k: v.reshape(1, self.out.numel(), *self.params[k].shape) for k, v in J.items()}

    def output_hessians(self):
        def total(f):
            return self.lf(f.reshape(self.out.shape), self.y)
        return hessian(total)(self.out.flatten()).unsqueeze(0)
