"""`make demo`: compile a residual network, show its IR, check ggn_diag, time it.

Run as ``python -m hogc.demo``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import hogc
from hogc.examples import ResidualMLP
from hogc.timing import median_time


def brute_force_ggn_diag(model, x, y):
    """sum_n diag(J_n^T H_n J_n) with full Jacobians and loss Hessians from torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    f1 = lambda p, xn: functional_call(model, p, (xn.unsqueeze(0),)).squeeze(0)  # noqa: E731
    J = vmap(jacrev(f1), in_dims=(None, 0))(params, x)
    out = model(x).detach()
    N = x.shape[0]
    H = vmap(hessian(lambda f, yn: nn.functional.cross_entropy(f.unsqueeze(0), yn.unsqueeze(0)) / N))(out, y)
    return {k: torch.einsum("no...,nop,np...->...", v, H, v) for k, v in J.items()}


def main():
    torch.manual_seed(0)
    model = ResidualMLP(d_in=32, width=64, d_out=10, depth=2).double()
    x, y = torch.randn(64, 32, dtype=torch.float64), torch.randint(0, 10, (64,))

    fn = hogc.compile(model, "ggn_diag")
    diag = fn(x, y)
    print("== hogc.compile(ResidualMLP, quantity='ggn_diag'): derivative program (excerpt) ==")
    lines = fn.ir.splitlines()
    print("\n".join(lines[:14] + ["  ..."] + [ln for ln in lines if "loss_sqrt_hessian" in ln][:1]
                    + lines[-6:-1]))

    ref = brute_force_ggn_diag(model, x, y)
    err = max((diag[k] - ref[k]).abs().max().item() for k in ref)
    scale = max(ref[k].abs().max().item() for k in ref)
    print(f"\n== check against brute force J^T H J (torch.func, float64) ==\nmax abs error {err:.2e} "
          f"(scale {scale:.2e}) -> {'OK' if err <= 1e-10 * max(1, scale) else 'MISMATCH'}")

    lf = nn.CrossEntropyLoss()

    def plain_grad():
        model.zero_grad(set_to_none=True)
        lf(model(x), y).backward()

    t0 = median_time(plain_grad, 20)
    print("\n== time relative to the plain autograd gradient (median of 20) ==")
    print("| quantity | ms | x gradient |\n|---|---:|---:|")
    print(f"| autograd gradient | {t0 * 1e3:.2f} | 1.00 |")
    for q in ("grad", "batch_l2", "ggn_diag"):
        f = hogc.compile(model, q)
        t = median_time(lambda: f(x, y), 20)
        print(f"| hogc {q} | {t * 1e3:.2f} | {t / t0:.2f} |")
    tb = median_time(lambda: brute_force_ggn_diag(model, x, y), 3)
    print(f"| brute-force ggn_diag (torch.func) | {tb * 1e3:.2f} | {tb / t0:.2f} |")
    if err > 1e-10 * max(1, scale):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
