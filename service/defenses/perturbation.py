"""Perturbation defenses: global norm clipping and additive noise (the two halves of DP-SGD's recipe)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from service.defenses.base import DEFENSES, Defense, Update, map_floating
from service.specs import ClipDefense, NoiseDefense


def clip(update: Mapping[str, Tensor], spec: ClipDefense, generator: torch.Generator) -> Update:
    """Scale the whole update so that its global L2 norm (over all floating tensors) is at most max_norm."""
    squares = [
        torch.linalg.vector_norm(v.detach().double()).item() ** 2
        for v in update.values()
        if v.is_floating_point()
    ]
    norm = math.sqrt(sum(squares))
    factor = min(1.0, spec.max_norm / norm) if norm > 0 else 1.0
    return map_floating(update, lambda x: x * factor if factor < 1.0 else x.clone())


def noise(update: Mapping[str, Tensor], spec: NoiseDefense, generator: torch.Generator) -> Update:
    """Add i.i.d. noise to every entry: Gaussian with std `scale`, or Laplace with scale b = `scale`.

    Draws are made on the generator's device and moved, so a seed gives the same noise on any device.
    Laplace(b) is sampled as b * (E1 - E2) with E1, E2 standard exponentials.
    """

    def one(x: Tensor) -> Tensor:
        if spec.scale == 0:
            return x.clone()
        dev = generator.device
        if spec.distribution == "gaussian":
            draw = torch.randn(x.shape, generator=generator, device=dev)
        else:
            e1 = torch.empty(x.shape, device=dev).exponential_(generator=generator)
            e2 = torch.empty(x.shape, device=dev).exponential_(generator=generator)
            draw = e1 - e2
        return x + spec.scale * draw.to(x.device, x.dtype)

    return map_floating(update, one)


DEFENSES.add("clip", Defense("clip the update's global L2 norm to max_norm", ClipDefense, clip))
DEFENSES.add(
    "noise",
    Defense("add Gaussian (std = scale) or Laplace (b = scale) noise to every entry", NoiseDefense, noise),
)
