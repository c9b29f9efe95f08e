"""Small models and a batch for the FL client tests: fast on a CPU, with and without batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

NUM_CLASSES = 5


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES))


@pytest.fixture
def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, NUM_CLASSES),
    )


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(5, 3, 6, 6, generator=gen), torch.tensor([0, 3, 1, 3, 4])
