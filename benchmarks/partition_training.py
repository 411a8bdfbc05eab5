"""Train a small tanh MLP on a synthetic classification task with hogc.optim.PartitionNewton
(order 2 and 3) against SGD and Adam; plot the training loss (docs/partition_training.png).

    python benchmarks/partition_training.py [--steps 300] [--out docs]
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from hogc.optim import PartitionNewton


def data(n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    y = (torch.tanh(x @ w) + 0.3 * torch.randn(n, 4, generator=g)).argmax(1)  # 4 classes, noisy
    return x, y


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def train(make_opt, steps, x, y, batch=128):
    m = model()
    opt, needs_batch = make_opt(m)
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss = lf(m(xb), yb)
        loss.backward()
        opt.step(batch=(xb, yb)) if needs_batch else opt.step()
        with torch.no_grad():
            losses.append(lf(m(x), y).item())
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    x, y = data()
    runs = {
        "SGD (lr 0.1)": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1), False),
        "Adam (lr 1e-2)": lambda m: (torch.optim.Adam(m.parameters(), lr=1e-2), False),
        "PartitionNewton order 2": lambda m: (PartitionNewton(m, partition="module", order=2, every=10), True),
        "PartitionNewton order 3": lambda m: (PartitionNewton(m, partition="module", order=3, every=10), True),
    }
    curves = {name: train(make, args.steps, x, y) for name, make in runs.items()}
    print("| optimizer | loss at 50 | 100 | final |\n|---|---:|---:|---:|")
    for name, c in curves.items():
        print(f"| {name} | {c[49]:.3f} | {c[99]:.3f} | {c[-1]:.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c, label=name)
    ax.set_xlabel("step (batch 128)")
    ax.set_ylabel("training loss (full data)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("tanh MLP 10-32-32-4, synthetic 4-class data")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "partition_training.png"), dpi=110)


if __name__ == "__main__":
    main()
