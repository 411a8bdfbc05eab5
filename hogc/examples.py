"""Built-in example models, available by name (demo, benchmarks, tests)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualMLP", "MultipliedBranches", "SharedLinear", "SequenceMLP", "mnist_mlp", "EXAMPLES", "PROBLEMS",
           "load_problem"]


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


def _classify(model_fn, shape, classes):
    def make(batch: int):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = model_fn()
        x = torch.randn((batch,) + shape, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        return model, x, y, nn.CrossEntropyLoss()
    return make


#: Example problems by name for the CLI and benchmarks: ``PROBLEMS[name](batch)`` returns
#: ``(model, x, y, loss)`` with seeded weights and data.
PROBLEMS = {
    "residual_mlp": _classify(lambda: ResidualMLP(d_in=32, width=64, d_out=10), (32,), 10),
    "multiplied_branches": _classify(lambda: MultipliedBranches(d_in=32, width=64, d_out=10), (32,), 10),
    "shared_linear": _classify(lambda: SharedLinear(d=64, d_out=10), (64,), 10),
    "sequence_mlp": _classify(lambda: SequenceMLP(seq=8, d=256, width=256, d_out=10), (8, 256), 10),
    "pair_sequence_mlp": _classify(lambda: SequenceMLP(seq=2, d=128, width=128, d_out=10), (2, 128), 10),
    "mnist_mlp": _classify(lambda: mnist_mlp(nn.Sigmoid), (784,), 10),
    "linear": _classify(lambda: nn.Sequential(nn.Linear(256, 128)), (256,), 128),
    "tanh_mlp": _classify(lambda: nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)), (64,), 10),
}


def load_problem(name: str, batch: int):
    """A built-in problem by name, or a user's ``module:callable`` (called with the batch size,
    returning ``(model, x, y)`` or ``(model, x, y, loss)``)."""
    if name in PROBLEMS:
        return PROBLEMS[name](batch)
    if ":" not in name:
        raise ValueError(f"unknown model '{name}': use one of {sorted(PROBLEMS)} or 'module:callable'")
    import importlib

    import os
    import sys

    mod, fn = name.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:  # console scripts do not put the cwd there
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load '{name}': {e}") from e
    out = obj(batch)
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise ValueError(f"'{name}' must return (model, x, y) or (model, x, y, loss), got {type(out).__name__}")
    return out if len(out) == 4 else (*out, nn.CrossEntropyLoss())
