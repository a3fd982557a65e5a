"""The simplified Sequential AlexNet of *Dive into Deep Learning* (§8.1), the one-device form."""

from __future__ import annotations

import torch
from torch import nn


def d2l_alexnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 224,
                dropout: float = 0.5) -> nn.Sequential:
    """1→96→256→384→384→256 channels, no LRN; the flatten size follows from ``image_size``."""
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
    )
    with torch.device("meta"):
        flat = trunk(torch.empty(1, in_channels, image_size, image_size)).shape[1]
    return nn.Sequential(
        *trunk,
        nn.Linear(flat, 4096), nn.ReLU(), nn.Dropout(p=dropout),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(p=dropout),
        nn.Linear(4096, num_classes),
    )
