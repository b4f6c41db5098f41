"""LeNet-300-100 and LeNet-5 as used by Han et al. 2015/2016 (Caffe's definitions)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet300100", "LeNet5"]


class LeNet300100(nn.Module):
    """Fully connected 784-300-100-10 net (266,610 parameters for 28x28 input)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (B, 784)
        x = self.dropout(self.relu(self.fc1(x)))
        x = self.dropout(self.relu(self.fc2(x)))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 (431,080 params).

    The Caffe model has ReLU only after fc1; we add ReLU after both convolutions as well,
    which does not change the parameter count.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.0,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))  # (B, 20, 12, 12)
        x = self.pool(self.relu(self.conv2(x)))  # (B, 50, 4, 4)
        x = torch.flatten(x, 1)  # (B, 800)
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)
