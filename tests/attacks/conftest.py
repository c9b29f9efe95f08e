"""Shared set-up of the attack tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from service.attacks.base import AttackProblem
from service.specs import NORMALIZATIONS, Knowledge


def _fedsgd_problem(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn_mode: str = "train"
) -> AttackProblem:
    model.train(bn_mode == "train")
    loss = nn.functional.cross_entropy(model(x), y)
    target = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    return AttackProblem(
        model=model,
        target=target,
        target_kind="gradient",
        param_names=[n for n, _ in model.named_parameters()],
        num_images=x.shape[0],
        image_shape=tuple(x.shape[1:]),
        num_classes=10,
        normalization=NORMALIZATIONS["cifar10"],
        knowledge=Knowledge.PRIORS,
        labels=y,
        bn_mode=bn_mode,
    )


@pytest.fixture
def fedsgd_problem() -> Callable[..., AttackProblem]:
    """`fedsgd_problem(model, x, y, bn_mode="train")`: the attack problem of the FedSGD gradient
    that `model` (its BN in `bn_mode`) computes on images x with labels y, labels known."""
    return _fedsgd_problem
