"""The scale-blind path for clients that normalise with their own batch statistics."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from service.attacks.base import Control
from service.attacks.bn_invariance import choose_scale, fix_scale, scale_invariant
from service.attacks.inverting import InvertingGradients, attack_model, fixed_scale_for
from service.specs import NORMALIZATIONS, Budget, InvertingGradientsParams


def _conv_bn(padding: int, eps: float = 1e-5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=padding, bias=False), nn.BatchNorm2d(6, eps=eps), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.LazyLinear(10),
    ).double()  # fmt: skip


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _relative_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = sum(float((u - v).pow(2).sum()) for u, v in zip(a, b, strict=True))
    return (diff / sum(float(u.pow(2).sum()) for u in a)) ** 0.5


@pytest.mark.parametrize("n", [1, 3])
def test_train_mode_bn_gradient_is_blind_to_scale_and_unpadded_to_channel_offsets(n):
    """x -> a x + b_c leaves the gradient unchanged when the first convolution has no padding
    (the offset is a per-channel constant that BN removes); zero padding lets the border see the
    offset, but the scale stays invisible. A random change of the same size is seen. (BN's eps is
    made negligible here to show the invariance exact; at the default 1e-5 it holds to ~1e-5.)"""
    x = torch.randn(n, 3, 10, 10, dtype=torch.float64)
    y = torch.arange(n) % 10
    offset = torch.tensor([0.7, -0.4, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    unpadded = _conv_bn(padding=0, eps=1e-12)
    _ = unpadded(x)  # materialise the lazy layer
    g = _grads(unpadded, x, y)
    assert _relative_change(g, _grads(unpadded, 2.5 * x + offset, y)) < 1e-8
    assert _relative_change(g, _grads(unpadded, x + 0.3 * torch.randn_like(x), y)) > 1e-2

    padded = _conv_bn(padding=1, eps=1e-12)
    _ = padded(x)
    g = _grads(padded, x, y)
    assert _relative_change(g, _grads(padded, 2.5 * x, y)) < 1e-8
    assert _relative_change(g, _grads(padded, x + offset, y)) > 1e-3


def _float_conv_bn() -> nn.Module:
    model = _conv_bn(padding=1).float()
    _ = model(torch.zeros(2, 3, 8, 8))
    return model


def test_the_scale_blind_path_is_picked_for_train_mode_bn_only(fedsgd_problem):
    x, y = torch.rand(1, 3, 8, 8), torch.tensor([2])
    params = InvertingGradientsParams()
    train = fedsgd_problem(_float_conv_bn(), x, y, "train")
    assert scale_invariant(train, attack_model(train), torch.Generator().manual_seed(0))
    fixed = fixed_scale_for(train, params)
    assert fixed is not None and fixed.rms == params.scale_rms and fixed.clip_fraction == params.clip_fraction
    assert fixed_scale_for(train, InvertingGradientsParams(scale_invariance="off")) is None

    model = _float_conv_bn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
    assert fixed_scale_for(fedsgd_problem(model, x, y, "eval"), params) is None

    # a first convolution with a bias and no BN after it: the scale shows in the gradient
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    problem = fedsgd_problem(plain, x, y, "train")
    assert not scale_invariant(problem, attack_model(problem), torch.Generator().manual_seed(0))


def test_the_attack_reports_the_scale_it_chose_and_stays_in_range(fedsgd_problem):
    x, y = torch.rand(1, 3, 8, 8), torch.tensor([2])
    problem = fedsgd_problem(_float_conv_bn(), x, y, "train")
    control = Control(Budget(iterations=6, restarts=1))
    result = InvertingGradients().run(
        problem, InvertingGradientsParams(), control, torch.Generator().manual_seed(0)
    )
    info = result.details["scale_invariance"]
    assert isinstance(info, dict) and info["scale"] > 0
    assert result.images.min() >= 0 and result.images.max() <= 1
    # eval mode: the plain path, no scale chosen
    eval_problem = fedsgd_problem(_float_conv_bn(), x, y, "eval")
    result = InvertingGradients().run(
        eval_problem, InvertingGradientsParams(), control, torch.Generator().manual_seed(0)
    )
    assert "scale_invariance" not in result.details


def test_fix_scale_sets_each_restarts_rms():
    images = torch.randn(3, 2, 3, 4, 4) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1, 1)
    fixed = fix_scale(images, 0.8)
    rms = fixed.pow(2).mean(dim=(1, 2, 3, 4)).sqrt()
    assert torch.allclose(rms, torch.full((3,), 0.8))
    # one scale per restart: the images' ratios inside a restart are kept
    assert torch.allclose(
        fixed[1] / images[1], torch.full_like(images[1], float(fixed[1, 0, 0, 0, 0] / images[1, 0, 0, 0, 0]))
    )


@pytest.mark.parametrize("clip_fraction", [0.0, 0.01, 0.1])
def test_choose_scale_clips_at_most_the_given_share_and_is_the_largest(clip_fraction):
    """Only the reconstruction and the valid range enter: the chosen scale clips at most the
    share asked for, and any larger scale clips more."""
    norm = NORMALIZATIONS["cifar10"]
    mean = torch.tensor(norm.mean).view(-1, 1, 1)
    std = torch.tensor(norm.std).view(-1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3

    def clipped(a: float) -> float:
        pixels = (a * images) * std + mean
        return float(((pixels < 0) | (pixels > 1)).double().mean())

    a = choose_scale(images, lo, hi, clip_fraction)
    assert a > 0
    assert clipped(a) <= clip_fraction + 1e-9
    assert clipped(a * 1.01) > clip_fraction
    # deterministic in its inputs: the same images give the same scale
    assert choose_scale(images.clone(), lo, hi, clip_fraction) == a


def test_scale_fields_are_validated():
    with pytest.raises(ValidationError):
        InvertingGradientsParams(clip_fraction=0.5)
    with pytest.raises(ValidationError):
        InvertingGradientsParams(clip_fraction=-0.1)
    with pytest.raises(ValidationError):
        InvertingGradientsParams(scale_rms=0)
    with pytest.raises(ValidationError):
        InvertingGradientsParams(scale_invariance="maybe")  # type: ignore[arg-type]


def test_gradinversion_keeps_the_scale_its_bn_prior_pins(fedsgd_problem):
    """The client's BN statistics scale with the images, so gradinversion's BN prior fixes the
    scale itself: the scale-blind path runs only with bn_weight 0."""
    from service.attacks.inverting import GradInversion
    from service.specs import GradInversionParams

    x, y = torch.rand(1, 3, 8, 8), torch.tensor([2])
    problem = fedsgd_problem(_float_conv_bn(), x, y, "train")
    stats = []
    for m in problem.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            stats.append((torch.zeros(m.num_features), torch.ones(m.num_features)))
    problem.bn_targets = stats
    control = Control(Budget(iterations=3, restarts=1))
    with_prior = GradInversion().run(
        problem, GradInversionParams(), control, torch.Generator().manual_seed(0)
    )
    assert "scale_invariance" not in with_prior.details
    control = Control(Budget(iterations=3, restarts=1))
    without = GradInversion().run(
        problem, GradInversionParams(bn_weight=0), control, torch.Generator().manual_seed(0)
    )
    assert "scale_invariance" in without.details
