"""The seed CNN, exactly as the founding document defines it.

Attribute names match the founding document's code so that a state_dict saved from it loads as is.
Dropout is active only in ``train()`` mode; the exported graph is taken in ``eval()`` mode.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class Cifar10CNN(nn.Module):
    """conv(3→32) → ReLU → Dropout(0.3) → conv(32→32) → ReLU → MaxPool(2) → FC(8192→512) → ReLU
    → Dropout(0.5) → FC(512→10). 4,210,090 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=(3, 3), stride=1, padding=1)
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=(3, 3), stride=1, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(kernel_size=(2, 2))
        self.flat = nn.Flatten()
        self.fc3 = nn.Linear(8192, 512)
        self.act3 = nn.ReLU()
        self.drop3 = nn.Dropout(0.5)
        self.fc4 = nn.Linear(512, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.flat(x)
        x = self.drop3(self.act3(self.fc3(x)))
        return self.fc4(x)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
