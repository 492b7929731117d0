"""Small models shared by the tests (and usable for quick experiments)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedReluNet(nn.Module):
    """One nn.ReLU module called at three call sites, an in-place functional relu and a method relu."""

    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y = self.relu(y)
        z = x - y  # (can be negative: the in-place relu below matters)
        F.relu(z, inplace=True)          # result unused: the in-place op mutates z
        z = self.relu(z) + z.relu() + z  # the last z must read the in-place relu result
        return self.fc(z.mean((2, 3)))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10, c: int = 8, in_ch: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        )
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))
