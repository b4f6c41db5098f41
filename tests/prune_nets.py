"""Small models outside the zoo used by the filter-pruning tests (not a test module itself)."""

from __future__ import annotations

import torch
from torch import nn

from nncompress.prune.graph import ChannelGroup


class Block(nn.Module):
    """ResNet-18 basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.down is None else self.down(x)
        return torch.relu(out + short)


class ResNet18ish(nn.Module):
    """Stem, an identity-shortcut block, a projection-shortcut block, pool, flatten, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.pool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1))
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.pool(self.stem(x))))
        return self.fc(torch.flatten(self.avg(x), 1))


class InceptionNet(nn.Module):
    """Three branches concatenated on channels, then a conv and flatten -> Linear (H*W > 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(3, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(3, 5, 1))
        self.bn = nn.BatchNorm2d(15)
        self.mix = nn.Conv2d(15, 7, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(7 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)  # (B, 15, 8, 8)
        y = self.pool(torch.relu(self.mix(torch.relu(self.bn(y)))))  # (B, 7, 4, 4)
        return self.fc2(torch.relu(self.fc1(y.view(y.size(0), -1))))


class SeparableNet(nn.Module):
    """conv -> BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dwbn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.dwbn(self.dw(x)))
        return self.head(torch.relu(self.pw(x)))


class MLPBlock(nn.Module):
    """Transformer-style MLP block: x + fc2(GELU(fc1(LayerNorm(x))))."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TinyTransformerMLP(nn.Module):
    """(B, T, D) tokens -> two MLP blocks -> final LayerNorm -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(MLPBlock(), MLPBlock())
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def randomize_bn_(model: nn.Module, seed: int = 0) -> None:
    """Give every norm layer non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)


def kill_channels_(model: nn.Module, group: ChannelGroup, channels: list[int]) -> None:
    """Make ``channels`` of ``group`` really dead: zero producer filters and biases, and make the
    BatchNorm / depthwise followers output exactly zero on them (beta = 0, running mean = 0)."""
    with torch.no_grad():
        for c in channels:
            for (name, role), positions in group.channels[c].items():
                m = model.get_submodule(name)
                for p in positions:
                    if role == "out" or (role == "follow" and isinstance(m, nn.Conv2d)):
                        m.weight[p] = 0
                        if m.bias is not None:
                            m.bias[p] = 0
                    elif role == "follow" and isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                        m.bias[p] = 0
                        m.running_mean[p] = 0
