"""The model zoo of the tests and benchmarks: the architectures curvature libraries struggle with.

Each builder takes sizes, so the tests run small copies and the benchmarks the real ones.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["c3d3", "GroupNormCNN", "ResNet", "TinyGPT"]


def c3d3(in_channels: int = 3, widths=(64, 96, 128), hidden=(512, 256), classes: int = 10,
         size: int = 32) -> nn.Sequential:
    """DeepOBS 3c3d (CIFAR-10): three conv + max-pool stages, then three linear layers.

    conv 5x5 valid, conv 3x3 valid, conv 3x3 same; each followed by ReLU and a 3x3 max pool of
    stride 2 (padding 1, TensorFlow's 'same' for these sizes); 32 -> 28 -> 14 -> 12 -> 6 -> 3.
    """
    def pooled(s):
        return (s + 2 - 3) // 2 + 1
    s = pooled(pooled(pooled(size - 4) - 2))
    return nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 5), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(widths[0], widths[1], 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(widths[1], widths[2], 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(), nn.Linear(widths[2] * s * s, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
        nn.Linear(hidden[1], classes))


class GroupNormCNN(nn.Sequential):
    """conv -> GroupNorm -> ReLU (x2, the second strided) -> global average pool -> linear."""

    def __init__(self, in_channels: int = 3, width: int = 16, groups: int = 4, classes: int = 10):
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


class _BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that can spell its maths out (``fused = False``) for reference computations:
    in train mode, torch 2.13's double backward of ``batch_norm`` gives an asymmetric Hessian
    (off by 0.11 of 0.45 on a small ResNet where finite differences agree with hogc to 4e-11).
    The spelled-out form does not update the running statistics."""

    fused = True

    def forward(self, x):
        if self.fused:
            return super().forward(x)
        if self.training:
            mu = x.mean((0, 2, 3), keepdim=True)
            var = ((x - mu) ** 2).mean((0, 2, 3), keepdim=True)
        else:
            mu, var = self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _BatchNorm2d(c_out)
        self.skip = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), _BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


class ResNet(nn.Module):
    """A ResNet-style network: stem conv + BatchNorm, residual blocks (one strided with a 1x1
    projection), global average pooling, linear head. In train mode its BatchNorms couple the
    samples: batch quantities only (the batch is then one sample)."""

    def __init__(self, in_channels: int = 3, widths=(16, 32), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  _BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for k, w in enumerate(widths):
            blocks += [_Block(c, w, 1 if k == 0 else 2)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def set_fused(self, fused: bool) -> None:
        """torch's batch_norm kernel (True), or the same maths spelled out (False) for references."""
        for m in self.modules():
            if isinstance(m, _BatchNorm2d):
                m.fused = fused

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class _LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that can spell its maths out (``fused = False``) for reference computations:
    torch 2.13's double backward of ``layer_norm`` through its weight is asymmetric (the mixed
    weight/input second derivative disagrees with finite differences), so torch.func Hessians of
    the fused op are wrong; hogc lowers layer_norm into the same spelled-out maths."""

    fused = True

    def forward(self, x):
        if self.fused:
            return super().forward(x)
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fused = True  # scaled_dot_product_attention; False: the same maths spelled out

    def forward(self, x):
        N, T, d = x.shape
        q, k, v = (z.view(N, T, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            a = torch.softmax(s, -1) @ v
        return self.proj(a.transpose(1, 2).reshape(N, T, d))


class _TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = _LayerNorm(d), _LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style language model: token and position embeddings, causal multi-head attention,
    LayerNorm, GELU MLPs, residuals, output layer tied to the token embedding. Input (N, T) token
    ids; output (N, vocab, T) logits, so ``CrossEntropyLoss`` gives the per-token loss."""

    def __init__(self, vocab: int = 32, d: int = 16, heads: int = 2, layers: int = 2, context: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(d, heads) for _ in range(layers)])
        self.ln = _LayerNorm(d)

    def set_fused(self, fused: bool) -> None:
        """Fused attention and LayerNorm kernels (True), or the same maths spelled out (False), which
        torch.func differentiates correctly to any order (references)."""
        for m in self.modules():
            if isinstance(m, (_Attention, _LayerNorm)):
                m.fused = fused

    def forward(self, ids):
        T = ids.shape[1]
        h = self.blocks(self.tok(ids) + self.pos[:T])
        return (self.ln(h) @ self.tok.weight.t()).transpose(1, 2)  # tied output layer
