"""The model registry of the quantity tests: (model, loss, input shape) with readable ids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hogc.examples import MultipliedBranches, ResidualMLP, SequenceMLP, SharedLinear


class OpsZoo(nn.Module):
    """Exercises structural ops: cat/stack, slicing, constant indexing, permute, mean, div, pow."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = torch.nn.functional.softplus(self.l1(x)) * self.scale  # (N, 8)
        a, b = h[:, :4], h[:, 4:]
        c = torch.stack([a, b.exp() / (1 + b.pow(2))], dim=1)  # (N, 2, 4)
        c = c.permute(0, 2, 1).reshape(x.shape[0], 8)
        d = torch.cat([c[:, torch.tensor([0, 3, 5, 7])], c.mean(dim=1, keepdim=True).expand(-1, 4)], 1)
        e = torch.nn.functional.leaky_relu(d[:, 1::2] - d[:, ::2].sqrt(), 0.2)
        return self.l2(e) / 2.0 + torch.log(1 + h[:, :3] ** 2)


class EinsumNet(nn.Module):
    """Functional contractions: einsum, bmm, matmul with a parameter tensor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 5) * 0.3)
        self.v = nn.Parameter(torch.randn(5, 2) * 0.3)

    def forward(self, x):  # x: (N, 3, 4)
        h = torch.einsum("nij,ijk->nik", x, self.w)  # (N, 3, 5)
        h = torch.nn.functional.selu(h)
        h = h @ self.v  # (N, 3, 2)
        return torch.nn.functional.logsigmoid(h).sum(-1) - h.mean(-1)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    x_shape: tuple[int, ...]
    sequential: bool = False  # BackPACK can run it

    def data(self, seed: int = 0):
        torch.manual_seed(seed)
        model = self.make().double()
        x = torch.randn(self.x_shape, dtype=torch.float64)
        if self.id.startswith("ops_zoo"):
            x = x.abs() + 0.1
        with torch.no_grad():
            out = model(x)
        lf = self.loss()
        if isinstance(lf, nn.CrossEntropyLoss):
            y = torch.randint(0, out.shape[1], (out.shape[0],))
        elif isinstance(lf, nn.BCEWithLogitsLoss):
            y = torch.rand(out.shape, dtype=torch.float64).round()
        else:
            y = torch.randn(out.shape, dtype=torch.float64)
        return model, lf, x, y


CASES = [
    Case("mlp_sigmoid_ce_mean", lambda: nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3)),
         nn.CrossEntropyLoss, (6, 5), sequential=True),
    Case("mlp_relu_mse_sum", lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
         lambda: nn.MSELoss(reduction="sum"), (5, 4), sequential=True),
    Case("mlp_tanh_bce_mean", lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
         nn.BCEWithLogitsLoss, (7, 4)),
    # BackPACK's BCEWithLogitsLoss supports scalar outputs only
    Case("mlp_elu_bce1_sum", lambda: nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 1)),
         lambda: nn.BCEWithLogitsLoss(reduction="sum"), (6, 4), sequential=True),
    Case("mlp_tanh_bce1_mean", lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
         nn.BCEWithLogitsLoss, (5, 3), sequential=True),
    Case("residual_mlp_ce_sum", lambda: ResidualMLP(8, 10, 4, depth=2), lambda: nn.CrossEntropyLoss(reduction="sum"),
         (5, 8)),
    Case("multiplied_branches_ce_mean", MultipliedBranches, nn.CrossEntropyLoss, (6, 6)),
    Case("shared_linear_mse_sum", SharedLinear, lambda: nn.MSELoss(reduction="sum"), (4, 5)),
    Case("sequence_mlp_bce_sum", SequenceMLP, lambda: nn.BCEWithLogitsLoss(reduction="sum"), (5, 4, 6)),
    Case("ops_zoo_mse_mean", OpsZoo, nn.MSELoss, (5, 6)),
    Case("einsum_net_ce_mean", EinsumNet, nn.CrossEntropyLoss, (4, 3, 4)),
]
