"""IGSA: deterministic, finite, lower where the input-gradient map moves faster, equal across the
kernel backends, and the model is left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.errors import SpecError
from service.metrics.igsa import igsa


class SineFeatures(nn.Module):
    """A fixed feature map sin(omega x) under a trainable linear classifier.

    With small classifier weights the softmax is nearly uniform, so the classifier's weight
    gradient is (p - y) sin(omega x)^T with p nearly constant: it moves with its input at a rate
    proportional to omega. A larger omega is a rougher input-gradient map by construction.
    """

    def __init__(self, omega: float, dim: int = 48, classes: int = 4) -> None:
        super().__init__()
        self.omega = omega
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            self.head.weight.mul_(1e-3)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sin(self.omega * x.flatten(1)))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 4, 4, generator=gen), torch.tensor([0, 1, 2, 3])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_igsa_is_deterministic_for_a_seed_and_finite(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = batch
    a = igsa(model, x, y, generator=seeded(5))
    b = igsa(model, x, y, generator=seeded(5))
    c = igsa(model, x, y, generator=seeded(6))
    assert a == b
    assert a.per_sample != c.per_sample
    assert math.isfinite(a.sensitivity) and 0 < a.score <= 1
    assert a.score == pytest.approx(1 / (1 + a.sensitivity))
    assert a.layers == 4 and a.samples == 8 and len(a.per_sample) == 8


def test_a_rougher_input_gradient_map_has_a_lower_igsa(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    scores = []
    for omega in (0.5, 2.0, 8.0):
        torch.manual_seed(0)
        scores.append(igsa(SineFeatures(omega), x, y, radius=0.02, generator=seeded()).score)
    assert scores[0] > scores[1] > scores[2]


def test_a_gradient_proportional_to_its_input_has_gain_one() -> None:
    """A linear classifier near uniform output: grad_W = (p - y) x^T moves exactly with x, so every
    perturbation's relative change is its relative radius (gain 1); the bias's gradient does not
    move (gain 0); the weights favour the first tensor 2:1, so S = sqrt(2/3)."""
    model = nn.Linear(12, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x = torch.randn(1, 12, generator=seeded(2))
    result = igsa(model, x, torch.tensor([1]), samples=4, generator=seeded(3))
    assert result.sensitivity == pytest.approx(math.sqrt(2 / 3), rel=1e-3)


def test_igsa_is_equal_across_kernel_backends(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))
    x, y = batch
    reference = igsa(model, x, y, generator=seeded(), backend="reference")
    fused = igsa(model, x, y, generator=seeded(), backend="triton")
    assert fused.per_sample == pytest.approx(reference.per_sample, rel=1e-5)
    assert fused.score == pytest.approx(reference.score, rel=1e-6)


def test_igsa_leaves_the_model_and_its_bn_statistics_untouched(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch
    igsa(model, x, y, generator=seeded(), bn_mode="train")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_igsa_refuses_bad_arguments(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    with pytest.raises(SpecError, match="radius"):
        igsa(model, x, y, radius=0)
    with pytest.raises(SpecError, match="labels"):
        igsa(model, x, y[:2])
