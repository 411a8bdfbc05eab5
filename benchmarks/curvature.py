"""Curvature quantities: hogc vs BackPACK vs torch.func, ratios to the plain gradient in one run.

Part A (MNIST MLP 784-512-256-10, sigmoid hidden layers, batch 128): Kronecker factors, GGN and
Hessian diagonals against BackPACK. Part B (small MLP 16-32-32-4, sigmoid, batch 32): full Hessian and
GGN against the torch.func recipes, Hessian diagonal against BackPACK's DiagHessian. Median wall
time over interleaved rounds, float32, CPU.

    python benchmarks/curvature.py [--repeat 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import hogc


def mlp(sizes, act=nn.Sigmoid):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def backpack_runner(model, x, y, ext_name):
    from backpack import backpack, extend
    from backpack import extensions as ext
    m = extend(mlp([model[0].in_features] + [l.out_features for l in model if isinstance(l, nn.Linear)]))
    m.load_state_dict(model.state_dict())
    lf = extend(nn.CrossEntropyLoss())

    def run():
        m.zero_grad(set_to_none=True)
        with backpack(getattr(ext, ext_name)()):
            lf(m(x), y).backward()
    return run


def torch_func_hessian(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [(k, p.shape, p.numel()) for k, p in params.items()]
    flat = torch.cat([p.flatten() for p in params.values()])

    def loss(f):
        ps, s = {}, 0
        for k, shp, n in shapes:
            ps[k] = f[s:s + n].reshape(shp)
            s += n
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)
    return lambda: hessian(loss)(flat)


def torch_func_ggn(model, x, y):
    """The torch.func GGN recipe: per-sample Jacobians (vmap of jacrev) and loss Hessians, J^T H J."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    N = x.shape[0]

    def f1(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),)).squeeze(0)

    def run():
        J = vmap(jacrev(f1), in_dims=(None, 0))(params, x)
        Jf = torch.cat([v.reshape(N, v.shape[1], -1) for v in J.values()], 2)
        out = functional_call(model, params, (x,))
        H = vmap(hessian(lambda o, yn: nn.functional.cross_entropy(o.unsqueeze(0), yn.unsqueeze(0)) / N))(out, y)
        return torch.einsum("noa,nop,npb->ab", Jf, H, Jf)
    return run


def measure(runners: dict, repeat: int) -> dict:
    for run in runners.values():
        run()
    times = {k: [] for k in runners}
    for _ in range(repeat):
        for k, run in runners.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def plain_runner(model, x, y):
    lf = nn.CrossEntropyLoss()

    def run():
        model.zero_grad(set_to_none=True)
        lf(model(x), y).backward()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    big = mlp([784, 512, 256, 10])
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    runners = {"grad": plain_runner(big, x, y)}
    pairs = [("kflr", "KFLR"), ("kfac", "KFAC"), ("kfra", "KFRA"), ("ggn_diag", "DiagGGNExact"),
             ("hessian_diag", "DiagHessian"), ("sqrt_ggn", "SqrtGGNExact")]
    for q, e in pairs:
        fn = hogc.compile(big, q, seed=0)
        runners[(q, "hogc")] = lambda fn=fn: fn(x, y)
        runners[(q, "BackPACK")] = backpack_runner(big, x, y, e)
    fn = hogc.compile(big, "ggn_eigen", top_k=5)
    runners[("ggn_eigen", "hogc")] = lambda: fn(x, y)
    med = measure(runners, args.repeat)
    print(f"A. MNIST MLP 784-512-256-10 (sigmoid), batch 128, float32, CPU, {torch.get_num_threads()} threads; "
          f"plain gradient {med['grad'] * 1e3:.2f} ms = 1.00\n")
    print("| quantity | hogc | BackPACK | BackPACK / hogc |\n|---|---:|---:|---:|")
    for q, _ in pairs:
        h, b = med[(q, "hogc")] / med["grad"], med[(q, "BackPACK")] / med["grad"]
        print(f"| {q} | {h:.2f} | {b:.2f} | {b / h:.2f}x |")
    print(f"| ggn_eigen (top 5) | {med[('ggn_eigen', 'hogc')] / med['grad']:.2f} | - | - |")

    small = mlp([16, 32, 32, 4])
    xs, ys = torch.randn(32, 16), torch.randint(0, 4, (32,))
    runners = {"grad": plain_runner(small, xs, ys)}
    for q in ("hessian", "ggn", "hessian_diag"):
        fn = hogc.compile(small, q)
        runners[(q, "hogc")] = lambda fn=fn: fn(xs, ys)
    runners[("hessian", "torch.func")] = torch_func_hessian(small, xs, ys)
    runners[("ggn", "torch.func")] = torch_func_ggn(small, xs, ys)
    runners[("hessian_diag", "BackPACK")] = backpack_runner(small, xs, ys, "DiagHessian")
    med = measure(runners, args.repeat)
    print(f"\nB. MLP 16-32-32-4 (sigmoid, D = {sum(p.numel() for p in small.parameters())}), batch 32; plain gradient "
          f"{med['grad'] * 1e3:.2f} ms = 1.00\n")
    print("| quantity | hogc | peer | peer / hogc |\n|---|---:|---:|---:|")
    for q, peer in (("hessian", "torch.func"), ("ggn", "torch.func"), ("hessian_diag", "BackPACK")):
        h, p = med[(q, "hogc")] / med["grad"], med[(q, peer)] / med["grad"]
        print(f"| {q} | {h:.2f} | {p:.2f} ({peer}) | {p / h:.2f}x |")


if __name__ == "__main__":
    main()
