"""hogc vs BackPACK vs torch.func on the MNIST-sized MLP (784-512-256-10, batch 128).

Every number is a ratio to the plain autograd gradient (``loss.backward()``) measured in
the same run: median wall time over interleaved rounds (each round times every runner
once, so a change of machine load hits all alike), float32, CPU. Prints a markdown table.

    python benchmarks/first_order.py [--repeat 10] [--batch 128] [--threads N]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

import hogc
from hogc.emit import runtime as R
from hogc.examples import mnist_mlp

QUANTITIES = ["grad", "batch_grad", "batch_l2", "sum_grad_squared", "variance", "ggn_diag", "ggn_diag_mc",
              "batch_ggn_diag"]


def backpack_runner(model, lf, x, y, quantity):
    from backpack import backpack, extend
    from backpack import extensions as ext
    table = {"grad": None, "batch_grad": ext.BatchGrad, "batch_l2": ext.BatchL2Grad,
             "sum_grad_squared": ext.SumGradSquared, "variance": ext.Variance, "ggn_diag": ext.DiagGGNExact,
             "ggn_diag_mc": ext.DiagGGNMC, "batch_ggn_diag": ext.BatchDiagGGNExact, "kflr": ext.KFLR}
    ext_cls = table[quantity]
    model, lf = extend(model), extend(lf)

    def run():
        model.zero_grad(set_to_none=True)
        loss = lf(model(x), y)
        if ext_cls is None:
            loss.backward()
        else:
            with backpack(ext_cls()):
                loss.backward()
    return run


def torch_func_runner(model, lf, x, y, quantity):
    """The torch.func recipes: vmapped per-sample gradients; per-sample VJPs of the loss-Hessian
    square-root columns for the GGN quantities."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    N = x.shape[0]

    def share(p, xn, yn):
        return nn.functional.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0)) / N

    per_sample = vmap(grad(share), in_dims=(None, 0, 0))

    def f1(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),)).squeeze(0)

    def sqrt_columns(S):  # S: (C, N, O) -> {name: (C, N, *param)}
        def one(xn, s):
            _, pull = vjp(lambda p: f1(p, xn), params)
            return pull(s)[0]
        return vmap(vmap(one, in_dims=(0, 0)), in_dims=(None, 0))(x, S)

    def run():
        if quantity == "grad":
            return grad(lambda p: lf(functional_call(model, p, (x,)), y))(params)
        if quantity in ("batch_grad", "batch_l2", "sum_grad_squared", "variance"):
            g = per_sample(params, x, y)
            if quantity == "batch_l2":
                return {k: (v**2).flatten(1).sum(1) for k, v in g.items()}
            if quantity == "sum_grad_squared":
                return {k: (v**2).sum(0) for k, v in g.items()}
            if quantity == "variance":
                return {k: (v**2).sum(0) / N - (v.sum(0) / N) ** 2 for k, v in g.items()}
            return g
        with torch.no_grad():
            out = model(x)
        if quantity == "ggn_diag_mc":
            S = R.loss_sqrt_hessian_mc(out, y, torch.tensor(0), "cross_entropy", "mean", 1)  # seed 0
        else:
            S = R.loss_sqrt_hessian(out, y, "cross_entropy", "mean")
        V = sqrt_columns(S)
        if quantity == "batch_ggn_diag":
            return {k: (v**2).sum(0) for k, v in V.items()}
        return {k: (v**2).sum((0, 1)) for k, v in V.items()}
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))
    model = mnist_mlp()
    lf = nn.CrossEntropyLoss()

    def plain():
        model.zero_grad(set_to_none=True)
        lf(model(x), y).backward()

    runners = {"plain": plain}
    for q in QUANTITIES:
        fn = hogc.compile(model, q, seed=0)
        runners[(q, "hogc")] = functools.partial(fn, x, y)
        bp_model = mnist_mlp()
        bp_model.load_state_dict(model.state_dict())
        runners[(q, "backpack")] = backpack_runner(bp_model, nn.CrossEntropyLoss(), x, y, q)
        runners[(q, "torch.func")] = torch_func_runner(model, lf, x, y, q)
    # interleaved rounds: a change of machine load hits every runner alike
    func_rounds = max(3, args.repeat // 3)
    times: dict = {k: [] for k in runners}
    for k, run in runners.items():
        run()  # warm-up (and the first compile)
    for r in range(args.repeat):
        for k, run in runners.items():
            if isinstance(k, tuple) and k[1] == "torch.func" and r >= func_rounds:
                continue
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    t_grad = med["plain"]
    print(f"MNIST MLP 784-512-256-10, batch {args.batch}, float32, CPU, torch threads: {torch.get_num_threads()}; "
          f"plain autograd gradient = {t_grad * 1e3:.2f} ms = 1.00; medians of {args.repeat} interleaved rounds "
          f"({func_rounds} for torch.func)\n")
    print("| quantity | hogc | BackPACK | torch.func | BackPACK / hogc | torch.func / hogc |")
    print("|---|---:|---:|---:|---:|---:|")
    for q in QUANTITIES:
        h, b, f = (med[(q, w)] / t_grad for w in ("hogc", "backpack", "torch.func"))
        print(f"| {q} | {h:.2f} | {b:.2f} | {f:.2f} | {b / h:.2f}x | {f / h:.1f}x |")


if __name__ == "__main__":
    main()
