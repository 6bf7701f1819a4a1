"""A small CNN for scikit-learn's 8x8 handwritten digits (the quickstart's embedded default)."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (the last one is the monitored layer), global pooling, a linear head.

    Input ``[B, 1, 8, 8]`` normalised to [-1, 1]; output ``[B, 10]`` logits.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
