"""IGSA, Input-Gradient Smoothness Analysis (SoK "Gradient Leakage in Federated Learning", Sec. 5.1):
how smoothly the gradient a client shares moves when its input moves.

An attack inverts the map x -> g(x) = grad_theta L(f_theta(x), y). Where that map is smooth
around the client's data, a small step in the reconstruction changes the gradient a little and
gradient matching is well guided; the SoK finds such models easy to invert (early rounds) and
rough ones hard (once the model fits). IGSA estimates the Jacobian's gain from finite differences.

Definition (what `igsa` computes). For a batch x (normalised, N images) with labels y, the loss is
the client's mean cross-entropy (`service.fl.client_loss`), the batch norms in the client's mode.
- Layers: the trainable parameter tensors l = 1..L in `named_parameters` order (the attack's
  matching layers); tensors whose gradient at x is zero (||g_l(x)|| <= 1e-20, e.g. a convolution
  bias before a batch norm) are left out.
- Perturbations: M directions drawn from a seeded standard normal, each image's scaled to norm
  rho x ||x_i|| (the relative radius, default rho = 0.05: a step of 5 % of the image's norm).
- Relative gain of sample m: s_m = sqrt( sum_l w_l ||g_l(x + delta_m) - g_l(x)||^2 / ||g_l(x)||^2 ) / rho,
  i.e. the weighted root-mean-square relative change of the layers' gradients per unit of
  relative input change (1 for a gradient that moves in proportion to its input).
- Layer weights favour the shallow layers: w_l proportional to L - l + 1 (the attack's "linear"
  layer weighting), normalised to sum to one.
- Sensitivity S = the mean of s_m over the M samples; IGSA = 1 / (1 + S), in (0, 1]:
  1 for a gradient that does not move with the input, falling towards 0 as the map roughens.
  HIGHER IGSA = SMOOTHER = easier to invert.

The weighted squared differences are one batched call of the gradient-matching kernel (the l2
cost with weights w_l / ||g_l(x)||^2), so every kernel backend computes IGSA the same way.
Cost: M + 1 first-order gradients of the batch (no second-order graph), about (M + 1) / 3 of one
attack iteration of the same batch; bench/federations.py measures it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import kernels
from service.errors import SpecError

ZERO_LAYER = 1e-20  # squared norm below which a layer's gradient counts as absent


@dataclass(frozen=True)
class IGSAResult:
    score: float  # 1 / (1 + sensitivity), higher = smoother
    sensitivity: float  # mean relative gain S
    per_sample: list[float]  # s_m
    layers: int  # layers used
    samples: int
    radius: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def igsa(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    samples: int = 8,
    radius: float = 0.05,
    bn_mode: str = "train",
    generator: torch.Generator | None = None,
    backend: kernels.Backend = "auto",
) -> IGSAResult:
    """IGSA of `model` around the normalised batch `images` (N, C, H, W) with integer `labels`.
    The model is not modified (batch norms in train mode would move its running statistics)."""
    from service.attacks.base import layer_weights
    from service.fl.client import check_batch, client_loss, training_mode

    check_batch(images, labels)
    if samples < 1 or not 0 < radius <= 1:
        raise SpecError(f"IGSA needs samples >= 1 and a radius in (0, 1]; got {samples}, {radius}")
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise SpecError("IGSA needs a model with trainable parameters")

    def gradient(x: torch.Tensor) -> list[torch.Tensor]:
        with training_mode(work, bn_mode):  # type: ignore[arg-type]
            loss = client_loss(work(x), labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]

    base = gradient(images)
    sq_norms = [float(g.double().square().sum()) for g in base]
    used = [i for i, n in enumerate(sq_norms) if n > ZERO_LAYER]
    if not used:
        raise SpecError("the batch's gradient is zero in every layer: IGSA is undefined there")
    shallow_first = layer_weights("linear", len(used)) or [1.0] * len(used)
    total = sum(shallow_first)
    weights = [w / total / sq_norms[i] for w, i in zip(shallow_first, used, strict=True)]

    flat = images.reshape(images.shape[0], -1)
    image_norms = flat.norm(dim=1, keepdim=True)
    perturbed: list[list[torch.Tensor]] = []
    for _ in range(samples):
        direction = torch.randn(
            flat.shape, generator=generator, device=generator.device if generator else None
        )
        direction = direction.to(images.device, images.dtype)
        step = direction * (radius * image_norms / direction.norm(dim=1, keepdim=True).clamp_min(1e-12))
        perturbed.append(gradient(images + step.reshape(images.shape)))
    candidate = [torch.stack([p[i] for p in perturbed]) for i in used]
    weighted = kernels.batched_gradient_matching_loss(
        candidate, [base[i] for i in used], cost="l2", layer_weights=weights, backend=backend
    )
    gains = [math.sqrt(max(float(v), 0.0)) / radius for v in weighted]
    sensitivity = sum(gains) / len(gains)
    return IGSAResult(
        score=1.0 / (1.0 + sensitivity),
        sensitivity=sensitivity,
        per_sample=gains,
        layers=len(used),
        samples=samples,
        radius=radius,
    )
