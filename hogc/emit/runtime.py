"""Runtime helpers the emitted programs call: losses and their exact Hessian factorizations.

For a loss ``L = r * sum_n l(f_n, y_n)`` (``r`` = 1 for reduction='sum', 1/N for
CrossEntropyLoss 'mean', 1/numel for MSELoss/BCEWithLogitsLoss 'mean', as torch defines
them), ``loss_sqrt_hessian`` returns ``S`` of shape ``(K, *f.shape)`` with
``sum_c S[c, n] S[c, n]^T = d^2 L / d f_n^2`` for every sample ``n`` (K = C, or C - 1 per
position for cross-entropy, whose Hessian has rank C - 1). Cross-entropy logits may
carry extra axes ``(N, C, *E)`` (a loss per token or pixel); each position is one softmax,
``ignore_index`` positions weigh 0 and 'mean' divides by the positions kept, as torch does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .random import categorical, normal, stream_of, uniform

__all__ = ["top_eigenvalues", "loss_value", "loss_grad", "loss_sqrt_hessian", "loss_sqrt_hessian_jvp",
           "loss_sqrt_hessian_mc",
           "slice_dim", "pad_dim", "index_dim", "index_add_dim"]


def _scale(reduction: str, f: torch.Tensor) -> float:
    """MSE and BCE: 'mean' divides by every output element (cross-entropy: ``_ce_weights``)."""
    return 1.0 if reduction == "sum" else 1.0 / f.numel()


def _rows(f: torch.Tensor) -> torch.Tensor:
    """Cross-entropy logits (N, C, *E) as (N * prod(E), C) rows, one per position."""
    return f.movedim(1, -1).reshape(-1, f.shape[1])


def _unrows(rows: torch.Tensor, f_shape, lead: int, at: int) -> torch.Tensor:
    """Inverse of ``_rows`` for a result with ``lead`` leading axes: (*lead, R, C) -> the class axis
    at position ``at`` of (*lead, N, C, *E)."""
    N, C, E = f_shape[0], f_shape[1], tuple(f_shape[2:])
    out = rows.reshape(rows.shape[:lead] + (N,) + E + (C,))
    return out.movedim(-1, at) if E else out


def _per_position(S: torch.Tensor, f_shape, lead: int) -> torch.Tensor:
    """Columns of each position on its own: (*lead, K, R, o) rows -> (*lead, K * prod(E), N, C, *E),
    column (k, e) nonzero only at position e (the loss Hessian is block-diagonal over positions)."""
    N, C, E = f_shape[0], f_shape[1], tuple(f_shape[2:])
    P, K = math.prod(E), S.shape[lead]
    lead_shape = S.shape[:lead]
    out = S.new_zeros(lead_shape + (K, P, N, C, P))
    rows = S.reshape(lead_shape + (K, N, P, C)).movedim(-1, -2)  # (*lead, k, N, o, e)
    out.diagonal(dim1=lead + 1, dim2=lead + 4).copy_(rows)
    return out.reshape(lead_shape + (K * P, N, C) + E)


def _ce_weights(f: torch.Tensor, y: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
    """Each position's weight in the loss: 0 where the target is ignored, 1 / (positions kept)
    for 'mean' (torch's convention), 1 for 'sum'."""
    keep = (y.reshape(-1) != ignore_index).to(f.dtype)
    if reduction == "mean":
        keep = keep / keep.sum().clamp_min(1.0)
    return keep


def _ce_target(y: torch.Tensor, C: int, dtype, ignore_index: int, smoothing: float) -> torch.Tensor:
    """The target distribution per row: one-hot, smoothed; ignored rows get any valid class."""
    yy = y.reshape(-1)
    hot = F.one_hot(torch.where(yy == ignore_index, 0, yy), C).to(dtype)
    return hot * (1.0 - smoothing) + smoothing / C if smoothing else hot


def loss_value(f: torch.Tensor, y: torch.Tensor, kind: str, reduction: str, ignore_index: int = -100,
               smoothing: float = 0.0) -> torch.Tensor:
    if kind == "cross_entropy":
        return F.cross_entropy(f, y, reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
    if kind == "mse":
        return F.mse_loss(f, y, reduction=reduction)
    return F.binary_cross_entropy_with_logits(f, y, reduction=reduction)


def loss_grad(f: torch.Tensor, y: torch.Tensor, kind: str, reduction: str, ignore_index: int = -100,
              smoothing: float = 0.0) -> torch.Tensor:
    if kind == "cross_entropy":
        rows = _rows(f)
        w = _ce_weights(f, y, reduction, ignore_index)
        g = (torch.softmax(rows, dim=1) - _ce_target(y, f.shape[1], f.dtype, ignore_index, smoothing)) * w[:, None]
        return _unrows(g, f.shape, 0, 1)
    r = _scale(reduction, f)
    if kind == "mse":
        return (f - y).mul_(2.0 * r)
    return (torch.sigmoid(f) - y).mul_(r)


def _ce_factor(p: torch.Tensor, reduced: bool) -> torch.Tensor:
    """A factor of ``diag(p) - p p^T`` per row of ``p`` (R, C), columns first: (K, R, C).

    Full (K = C, BackPACK's): ``S = diag(q) - p q^T`` with ``q = sqrt(p)``. Reduced (K = C - 1):
    ``diag(p) - p p^T = diag(q) (I - q q^T) diag(q)`` and ``|q| = 1``, so any orthonormal basis of
    ``q``'s complement gives a factor. The Householder reflection ``P = I - w w^T / (1 + q_C)``,
    ``w = q + e_C``, maps ``q`` to ``-e_C``; its first C - 1 columns are that basis, and
    ``1 + q_C >= 1`` keeps it stable. Column j: ``S[j, o] = q_o (delta_jo - w_o a_j)``, ``a = q / (1 + q_C)``.
    """
    q = p.sqrt()
    if not reduced:
        S = (q.t().contiguous().unsqueeze(2) * p.unsqueeze(0)).neg_()  # (c, R, o): -sqrt(p_c) p_o
        S.diagonal(dim1=0, dim2=2).add_(q)
        return S
    w, a = _householder(q)
    S = (a.t().contiguous().unsqueeze(2) * (q * w).unsqueeze(0)).neg_()  # (j, R, o): -a_j q_o w_o
    S.diagonal(dim1=0, dim2=2).add_(q[:, :-1])
    return S


def _householder(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, a) of the reduced factor: ``w = q + e_C`` (R, C), ``a = q_{<C} / (1 + q_C)`` (R, C-1)."""
    w = torch.cat([q[:, :-1], q[:, -1:] + 1], dim=1)
    return w, q[:, :-1] / w[:, -1:]


def _ce_reduced(f: torch.Tensor, columns: int) -> bool:
    """Whether a cross-entropy factor with ``columns`` columns is the rank-(C-1) one."""
    C = f.shape[1]
    return C > 1 and columns == math.prod(f.shape[2:]) * (C - 1)


def loss_sqrt_hessian(f: torch.Tensor, y: torch.Tensor, kind: str, reduction: str, ignore_index: int = -100,
                      smoothing: float = 0.0, columns: int | None = None) -> torch.Tensor:
    """Exact symmetric factorization, shape (K, *f.shape): K = ``columns`` (``num_columns``; for
    cross-entropy C - 1 or C per position). Label smoothing leaves the Hessian as is."""
    N = f.shape[0]
    if kind == "cross_entropy":
        reduced = columns is not None and _ce_reduced(f, columns)
        S = _ce_factor(torch.softmax(_rows(f), dim=1), reduced)
        S.mul_(_ce_weights(f, y, reduction, ignore_index).sqrt()[None, :, None])
        return S if f.ndim == 2 else _per_position(S, f.shape, 0)
    r = math.sqrt(_scale(reduction, f))
    flat = f.reshape(N, -1)
    C = flat.shape[1]
    if kind == "mse":
        d = torch.full_like(flat, math.sqrt(2.0) * r)
    else:
        s = torch.sigmoid(flat)
        d = (s * (1 - s)).sqrt_().mul_(r)
    S = torch.diag_embed(d).permute(1, 0, 2)  # (C, N, C)
    return S.reshape((C,) + tuple(f.shape))


def loss_sqrt_hessian_jvp(f: torch.Tensor, y: torch.Tensor, t: torch.Tensor, kind: str, reduction: str,
                          ignore_index: int = -100, smoothing: float = 0.0, columns: int | None = None) -> torch.Tensor:
    """Directional derivative of ``loss_sqrt_hessian`` (with the same ``columns``) along each tangent
    ``t[s]`` (shape ``(S, *f.shape)``): shape ``(S, K, *f.shape)``. It carries the loss's third derivative."""
    S_, N = t.shape[0], f.shape[0]
    if kind == "cross_entropy":
        p = torch.softmax(_rows(f), dim=1)
        t = t.movedim(2, -1).reshape(S_, -1, f.shape[1])  # (S, R, C)
        q = p.sqrt()
        dq = q * (t - (p * t).sum(-1, keepdim=True)) / 2  # dsqrt(p) = dp / (2 sqrt p), finite as p -> 0
        if columns is not None and _ce_reduced(f, columns):
            # S[j, o] = q_o delta_jo - a_j u_o with u = q w, w = q + e_C, a = q_{<C} / w_C; dw = dq
            w, a = _householder(q)
            du = dq * (w + q)
            da = (dq[..., :-1] - a * dq[..., -1:]) / w[:, -1:]
            out = -(da.transpose(1, 2).unsqueeze(3) * (q * w).unsqueeze(0).unsqueeze(0))  # (S, j, R, o)
            out -= a.t().unsqueeze(0).unsqueeze(3) * du.unsqueeze(1)
            out.diagonal(dim1=1, dim2=3).add_(dq[..., :-1])
        else:
            # S[c, o] = delta_co sqrt(p_c) - sqrt(p_c) p_o;  dp = 2 sqrt(p) dsqrt(p)
            out = -(dq.transpose(1, 2).unsqueeze(3) * p.unsqueeze(0).unsqueeze(0))  # (S, c, R, o): -dsqrt(p_c) p_o
            out -= q.t().unsqueeze(0).unsqueeze(3) * (2 * q * dq).unsqueeze(1)  # -sqrt(p_c) dp_o
            out.diagonal(dim1=1, dim2=3).add_(dq)
        out.mul_(_ce_weights(f, y, reduction, ignore_index).sqrt()[None, None, :, None])
        return out if f.ndim == 2 else _per_position(out, f.shape, 1)
    r = math.sqrt(_scale(reduction, f))
    flat_t = t.reshape(S_, N, -1)
    C = flat_t.shape[2]
    if kind == "mse":
        return torch.zeros((S_, C) + tuple(f.shape), dtype=f.dtype, device=f.device)
    s = torch.sigmoid(f.reshape(N, -1))
    d = (s * (1 - s)).sqrt_().mul_(r)
    dd = d * (1 - 2 * s) / 2 * flat_t  # d/df sqrt(s (1 - s)) = sqrt(s (1 - s)) (1 - 2 s) / 2
    out = torch.diag_embed(dd).permute(0, 2, 1, 3)  # (S, C, N, C)
    return out.reshape((S_, C) + tuple(f.shape))


#: the stream of the Monte-Carlo columns' draws (hogc.emit.random)
MC_STREAM = stream_of("loss_sqrt_hessian_mc")


def loss_sqrt_hessian_mc(f: torch.Tensor, y: torch.Tensor, seed: torch.Tensor, kind: str,
                         reduction: str, mc_samples: int, ignore_index: int = -100,
                         smoothing: float = 0.0) -> torch.Tensor:
    """Monte-Carlo factor ``(M, *f.shape)``: E[sum_m s_m s_m^T] = d2L/df2 (Fisher sampling), drawn
    from the call's seed (``hogc.emit.random``: traceable, no torch.Generator inside)."""
    if kind == "cross_entropy":
        p = torch.softmax(_rows(f), dim=1)
        draws = categorical(p, seed, MC_STREAM, mc_samples)  # (M, R)
        onehot = F.one_hot(draws, f.shape[1]).to(f.dtype)  # (M, R, C)
        w = (_ce_weights(f, y, reduction, ignore_index) / mc_samples).sqrt()
        return _unrows((p.unsqueeze(0) - onehot) * w[None, :, None], f.shape, 1, 2)
    r = math.sqrt(_scale(reduction, f) / mc_samples)
    shape = (mc_samples,) + tuple(f.shape)
    if kind == "mse":
        eps = normal(seed, MC_STREAM, shape, f.dtype, f.device)
        return eps.mul_(math.sqrt(2.0) * r)
    s = torch.sigmoid(f)
    u = uniform(seed, MC_STREAM, shape, f.dtype, f.device)
    return (s.unsqueeze(0) - (u < s.unsqueeze(0)).to(f.dtype)).mul_(r)


def slice_dim(x: torch.Tensor, dim: int, start: int, stop: int, step: int) -> torch.Tensor:
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(start, stop, step)
    return x[tuple(idx)]


def pad_dim(x: torch.Tensor, dim: int, start: int, step: int, size: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size
    out = x.new_zeros(shape)
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(start, start + step * (x.shape[dim] - 1) + 1, step)
    out[tuple(idx)] = x
    return out


def index_dim(x: torch.Tensor, dim: int, index: tuple[int, ...]) -> torch.Tensor:
    return x.index_select(dim, torch.tensor(index, device=x.device))


def index_add_dim(x: torch.Tensor, dim: int, index: tuple[int, ...], size: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size
    return x.new_zeros(shape).index_add_(dim, torch.tensor(index, device=x.device), x)


def windows(x: torch.Tensor, dim: int, taps: int, dil: int, outs: int, stride: int) -> torch.Tensor:
    """Axis dim of x becomes (taps, outs), ``[.., t, o, ..] = x[.., t dil + o stride, ..]``: a
    strided view (the im2col of one axis, no copy)."""
    span = (taps - 1) * dil + 1
    w = x.narrow(dim, 0, (outs - 1) * stride + span).unfold(dim, span, stride)  # (.., outs, .., span)
    return w[..., ::dil].movedim(-1, dim)


def gather(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.gather along ``dim`` (< 0) with ``idx`` broadcast right-aligned against the result."""
    shape = list(x.shape)
    shape[dim] = idx.shape[dim]
    return torch.gather(x, dim, idx.expand(shape))


def scatter_add(v: torch.Tensor, idx: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The transpose of :func:`gather`: zeros of ``size`` along ``dim``, v added at idx."""
    shape = list(v.shape)
    shape[dim] = size
    return v.new_zeros(shape).scatter_add_(dim, idx.expand(v.shape), v)


def conv(x: torch.Tensor, w: torch.Tensor, kind: str, stride, padding, dilation,
         output_padding, groups: int = 1) -> torch.Tensor:
    """A convolution over len(stride) spatial axes, no bias: ``forward``, ``transposed``, or
    ``weight`` (the weight gradient of a forward convolution of x with output gradient w, in
    ``groups`` groups; ``output_padding`` holds the kernel size then)."""
    d = len(stride)
    if kind == "weight":
        fn = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[d - 1]
        return fn(x, (w.shape[1], x.shape[1] // groups, *output_padding), w, stride, padding, dilation, groups)
    if kind == "transposed":
        k = w.shape[2:]
        flip_pad = [dl * (kk - 1) - p for kk, p, dl in zip(k, padding, dilation)]
        if all(st == 1 for st in stride) and not any(output_padding) and min(flip_pad) >= 0:
            # stride 1: a forward convolution with the flipped kernel (2-3x faster on CPU than torch's
            # conv_transpose, which goes through the col2im path)
            fn = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
            return fn(x, w.transpose(0, 1).flip(list(range(2, 2 + d))), None, 1, flip_pad, dilation)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
        return fn(x, w, None, stride, padding, output_padding, 1, dilation)
    fn = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    return fn(x, w, None, stride, padding, dilation)


def top_eigenvalues(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest eigenvalues of a symmetric matrix, in descending order."""
    return torch.linalg.eigvalsh(matrix).flip(0)[:k]
