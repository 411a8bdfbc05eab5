"""hogc vs BackPACK on DeepOBS 3c3d (CIFAR-10 sized, batch 32), and hogc vs the torch.func recipes
on the ResNet and the transformer of the model zoo, where BackPACK cannot run: ratios to the plain
autograd gradient measured in one run (medians of interleaved rounds), float32, CPU.

    python benchmarks/zoo.py [--repeat 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import functools

import torch
from torch import nn

import hogc
from hogc.zoo import ResNet, TinyGPT, c3d3

from curvature import measure, plain_runner
from first_order import backpack_runner, torch_func_runner

C3D3_QUANTITIES = ["grad", "batch_grad", "batch_l2", "sum_grad_squared", "variance", "ggn_diag", "kflr"]
ZOO_QUANTITIES = ["grad", "batch_l2", "sum_grad_squared", "ggn_diag_mc", "ggn_diag"]


def c3d3_table(repeat: int) -> list[str]:
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model = c3d3()
    runners = {"plain": plain_runner(model, x, y)}
    for q in C3D3_QUANTITIES:
        runners[(q, "hogc")] = functools.partial(hogc.compile(model, q), x, y)
        bp = c3d3()
        bp.load_state_dict(model.state_dict())
        runners[(q, "backpack")] = backpack_runner(bp, nn.CrossEntropyLoss(), x, y, q)
    med = measure(runners, repeat)
    rows = [f"3c3d (895,210 parameters), batch 32, plain gradient = {med['plain'] * 1e3:.1f} ms = 1.00\n",
            "| quantity | hogc | BackPACK | BackPACK / hogc |", "|---|---:|---:|---:|"]
    for q in C3D3_QUANTITIES:
        h, b = med[(q, "hogc")] / med["plain"], med[(q, "backpack")] / med["plain"]
        rows.append(f"| {q} | {h:.2f} | {b:.2f} | {b / h:.2f}x |")
    return rows


def zoo_table(repeat: int) -> list[str]:
    """hogc and the torch.func recipes (vmapped per-sample gradients, vmapped VJPs of the
    loss-Hessian square-root columns) on the ResNet and the transformer, ratios to the plain gradient."""
    torch.manual_seed(0)
    problems = {
        "ResNet (BatchNorm eval), 3x32x32, batch 32": (ResNet().eval(), torch.randn(32, 3, 32, 32),
                                                        torch.randint(0, 10, (32,))),
        "TinyGPT (vocab 32, d 16, 2 layers, T 8), batch 32": (TinyGPT(), torch.randint(0, 32, (32, 8)),
                                                               torch.randint(0, 32, (32, 8))),
    }
    rows = []
    for name, (model, x, y) in problems.items():
        runners = {"plain": plain_runner(model, x, y)}
        for q in ZOO_QUANTITIES:
            runners[(q, "hogc")] = functools.partial(hogc.compile(model, q, seed=0), x, y)
            runners[(q, "torch.func")] = torch_func_runner(model, nn.CrossEntropyLoss(), x, y, q)
        med = measure(runners, repeat)
        rows += [f"{name}, plain gradient = {med['plain'] * 1e3:.1f} ms = 1.00\n",
                 "| quantity | hogc | torch.func | torch.func / hogc |", "|---|---:|---:|---:|"]
        for q in ZOO_QUANTITIES:
            h, f = med[(q, "hogc")] / med["plain"], med[(q, "torch.func")] / med["plain"]
            rows.append(f"| {q} | {h:.2f} | {f:.2f} | {f / h:.2f}x |")
        rows.append("")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, float32; ratios to the plain "
          f"autograd gradient of the same model, medians of {args.repeat} interleaved rounds\n")
    print("\n".join(c3d3_table(args.repeat)))
    print()
    print("\n".join(zoo_table(args.repeat)))


if __name__ == "__main__":
    main()
