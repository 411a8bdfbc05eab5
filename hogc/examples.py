"""Built-in example models, available by name (demo, benchmarks, tests)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualMLP", "MultipliedBranches", "SharedLinear", "SequenceMLP", "mnist_mlp", "EXAMPLES"]


class ResidualMLP(nn.Module):
    """x -> Linear -> [h + Linear(act(Linear(h)))] x depth -> Linear."""

    def __init__(self, d_in: int = 8, width: int = 16, d_out: int = 4, depth: int = 2, act=nn.Tanh):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), act(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(torch.relu(h))


class MultipliedBranches(nn.Module):
    """Two branches of the same input multiplied elementwise (a gated unit)."""

    def __init__(self, d_in: int = 6, width: int = 10, d_out: int = 3):
        super().__init__()
        self.a, self.b = nn.Linear(d_in, width), nn.Linear(d_in, width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        return self.out(torch.sigmoid(self.a(x)) * torch.tanh(self.b(x)))


class SharedLinear(nn.Module):
    """One Linear used twice (weight sharing across depth)."""

    def __init__(self, d: int = 5, d_out: int = 5):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = torch.nn.functional.silu(self.shared(x))
        h = torch.nn.functional.gelu(self.shared(h))
        return self.head(h)


class SequenceMLP(nn.Module):
    """A Linear applied at every position of a sequence (weights shared over positions)."""

    def __init__(self, seq: int = 4, d: int = 6, width: int = 8, d_out: int = 3):
        super().__init__()
        self.token = nn.Linear(d, width)
        self.head = nn.Linear(seq * width, d_out)

    def forward(self, x):  # x: (N, seq, d)
        return self.head(torch.nn.functional.elu(self.token(x)).flatten(1))


def mnist_mlp(act=nn.ReLU) -> nn.Sequential:
    """The MNIST-sized MLP of the benchmarks: 784-512-256-10."""
    return nn.Sequential(nn.Linear(784, 512), act(), nn.Linear(512, 256), act(), nn.Linear(256, 10))


EXAMPLES = {"residual_mlp": ResidualMLP, "multiplied_branches": MultipliedBranches,
            "shared_linear": SharedLinear, "sequence_mlp": SequenceMLP, "mnist_mlp": mnist_mlp}
