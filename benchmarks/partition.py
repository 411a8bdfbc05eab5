"""Partition-level tensors (Wolinski 2023) against the nested-autograd reference, one run.

    python benchmarks/partition.py --threads 2

Deep tanh MLP 784 -> 7 x 256 -> 10 (16 parameter tensors), batch 128, direction = gradient.
S = 16 (one subset per parameter tensor), 8 (per layer), 4 (pairs of layers). The reference
differentiates autograd graphs one subset at a time: g (1 pass), H u_s (S passes), then either
the diagonal D_sss (S more: the optimizer's need) or every D_st. (S(S+1)/2 passes, symmetry used).
hogc computes the same two things: partition_hessian with partition_d3_diag, or with partition_d3.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import hogc
from hogc.timing import median_time, peak_memory


def mlp():
    torch.manual_seed(0)
    layers, d = [], 784
    for _ in range(7):
        layers += [nn.Linear(d, 256), nn.Tanh()]
        d = 256
    return nn.Sequential(*layers, nn.Linear(d, 10))


def partitions(model):
    names = [k for k, _ in model.named_parameters()]
    per_layer = [names[i:i + 2] for i in range(0, len(names), 2)]
    return {16: [[k] for k in names], 8: per_layer, 4: [per_layer[i] + per_layer[i + 1] for i in range(0, 8, 2)]}


def nested(model, x, y, part, full: bool):
    params = [p for _, p in model.named_parameters()]
    names = [k for k, _ in model.named_parameters()]
    where = {k: j for j, sub in enumerate(part) for k in sub}
    S = len(part)

    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        u = [gi.detach() for gi in g]
        hu = []
        for s in range(S):
            dot = sum((gi * ui).sum() for gi, ui, k in zip(g, u, names) if where.get(k) == s)
            hu.append(torch.autograd.grad(dot, params, create_graph=True))
        H = torch.stack([torch.stack([sum((h * ui).sum() for h, ui, k in zip(hu[s], u, names) if where.get(k) == t)
                                      for t in range(S)]) for s in range(S)])
        D = torch.zeros(S, S, S, device=x.device)
        pairs = [(s, t) for s in range(S) for t in range(s, S)] if full else [(s, s) for s in range(S)]
        for s, t in pairs:
            q = sum((h * ui).sum() for h, ui, k in zip(hu[s], u, names) if where.get(k) == t)
            d = torch.autograd.grad(q, params, retain_graph=True)
            for v in range(S):
                D[s, t, v] = D[t, s, v] = sum((di * ui).sum() for di, ui, k in zip(d, u, names) if where.get(k) == v)
        return H.detach(), D
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategy", default="auto", choices=("auto", "dense", "unrolled"),
                    help="hogc's partition_strategy (auto: dense on CUDA, unrolled elsewhere)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = mlp().to(dev)
    x, y = torch.randn(args.batch, 784, device=dev), torch.randint(0, 10, (args.batch,), device=dev)
    rows = []
    for S, part in partitions(model).items():
        start = time.perf_counter()
        full = hogc.compile(model, ("partition_hessian", "partition_d3"), partition=part, partition_strategy=args.strategy)
        out = full(x, y)
        compile_s = time.perf_counter() - start
        diag = hogc.compile(model, ("partition_hessian", "partition_d3_diag"), partition=part,
                            partition_strategy=args.strategy)
        out_diag = diag(x, y)
        ref_diag, ref_full = nested(model, x, y, part, False), nested(model, x, y, part, True)
        H, D = ref_full()
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        err = max(rel(out["partition_hessian"], H), rel(out["partition_d3"], D),
                  rel(out_diag["partition_d3_diag"], D.diagonal(0, 0, 1).diagonal(0, 0, 1)))
        fns = (lambda: diag(x, y), ref_diag, lambda: full(x, y), ref_full)
        t = [median_time(f, args.repeat) for f in fns]
        m = [peak_memory(f, dev.type) / 2**20 for f in fns]
        rows.append(f"| {S} | {t[0] * 1e3:.0f} | {t[1] * 1e3:.0f} | **{t[1] / t[0]:.1f}x** | {t[2] * 1e3:.0f} | "
                    f"{t[3] * 1e3:.0f} | **{t[3] / t[2]:.1f}x** | {m[0]:.0f} | {m[1]:.0f} | {m[2]:.0f} | {m[3]:.0f} | "
                    f"{compile_s:.1f} | {err:.1e} |")
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nDeep tanh MLP 784-7x256-10, batch {args.batch}, {where}, float32, torch {torch.__version__}, "
          f"partition_strategy={full.explain().strategies['partition_d3']}\n")
    print("| S | hogc H + diag D ms | nested H + diag D ms | speed-up | hogc H + full D ms | nested H + full D ms | "
          "speed-up | hogc diag MiB | nested diag MiB | hogc full MiB | nested full MiB | hogc compile s | "
          "max rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
