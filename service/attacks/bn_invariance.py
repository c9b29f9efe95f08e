"""Train-mode batch norm after a bias-free first convolution: the scale the update cannot see.

A client that normalises its batch with the batch's own statistics (BN in train mode) right after
a bias-free first convolution (ResNets, most BN models) shares a gradient that is invariant
(up to BN's eps) to scaling its images, x -> a * x with one a > 0 for the whole batch, in the normalised
input space (pixels about the dataset mean): the convolution is linear, and BN divides the scale
out before anything else sees it. The image is therefore only determined up to that scale, and an
attack that does not fix it drifts along it (a TV prior pulls the contrast down for free).

A per-channel offset b_c would be invisible too to a convolution without padding (it becomes a
per-output-channel constant that BN removes, and BN's backward has zero mean per channel), but a
zero-padded convolution sees it at the border: on an untrained CIFAR ResNet-18, an offset of 1 %
of the image's norm changes the gradient by 18 % (random noise of the same norm: 55 %, the scale:
0.001 %). So only the scale is fixed here; the offsets stay with the gradient.

The attack then (1) keeps every iterate at one root-mean-square value in the normalised space, so
the optimiser cannot drift along the scale and TV cannot buy itself low contrast, and (2) picks
the scale at the end from the valid pixel range alone, never from the ground truth: the largest
scale at which at most `clip_fraction` of the pixels fall outside [0, 1] (`choose_scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from service.attacks.base import AttackProblem

# The check runs the model in float64 with its BN layers' eps made negligible (PROBE_EPS), so
# it sees the structure rather than rounding: a train-mode ResNet-18's gradient is so sensitive to
# its input (a random change of 1e-4 of the image's norm moves it by 6 %) that float32 rounding and
# BN's eps, amplified, move it by up to 0.5 % at x1.01 although the invariance holds. In float64 the
# change is ~1e-10 when the invariance holds; eval-mode BN or a model without BN changes by ~10 %.
PROBE_SCALE = 1.5
PROBE_EPS = 1e-12
INVARIANCE_TOLERANCE = 1e-4


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def scale_invariant(problem: AttackProblem, model: nn.Module, generator: torch.Generator) -> bool:
    """Whether the client's gradient is blind to the images' scale: checked numerically on the
    attacker's model run with float64 copies of its weights (BN in the client's mode, eps made
    negligible) at a random
    batch of the problem's shape and PROBE_SCALE times it. Only train-mode BN can make it so, so
    eval-mode clients are not even checked."""
    if problem.bn_mode != "train" or not _has_batch_norm(model):
        return False
    n, (c, h, w) = problem.num_images, problem.image_shape
    x = (torch.rand((n, c, h, w), generator=generator, dtype=torch.float64) * 2 - 1).to(problem.device)
    y = (
        problem.labels.to(problem.device)
        if problem.labels is not None
        else torch.zeros(n, dtype=torch.long, device=problem.device)
    )
    # float64 copies of the weights run through the model itself (no copy of the module, whose
    # hooks may hold graph tensors), with BN's eps made negligible for the check's duration
    params = {k: p.detach().double().requires_grad_() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        return False
    buffers = {k: (b.double() if b.is_floating_point() else b) for k, b in model.named_buffers()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.eps for m in norms]

    def grads(inputs: torch.Tensor) -> list[torch.Tensor]:
        out = functional_call(model, (params, buffers), (inputs,))
        return list(torch.autograd.grad(F.cross_entropy(out, y), list(params.values())))

    try:
        for m in norms:
            m.eps = PROBE_EPS
        g1, g2 = grads(x), grads(PROBE_SCALE * x)
    except (ValueError, RuntimeError):  # e.g. BN that sees one value per channel
        return False
    finally:
        for m, eps in zip(norms, saved, strict=True):
            m.eps = eps
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(g1, g2, strict=True))
    norm = sum(float(a.pow(2).sum()) for a in g1)
    return norm > 0 and math.isfinite(diff) and (diff / norm) ** 0.5 < INVARIANCE_TOLERANCE


def fix_scale(images: torch.Tensor, rms: float) -> torch.Tensor:
    """Each restart's batch (R, N, C, H, W) rescaled to root-mean-square `rms` over all of it (the
    invariance is one scale for the whole batch, since BN's statistics pool the batch)."""
    current = images.pow(2).mean(dim=tuple(range(1, images.dim())), keepdim=True).sqrt()
    return images * (rms / current.clamp_min(1e-12))


def choose_scale(images: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, clip_fraction: float) -> float:
    """The scale a for a batch `images` (N, C, H, W) in the normalised space whose bounds are
    lo, hi (C, 1, 1), lo < 0 < hi: the largest a at which at most `clip_fraction` of a * images
    fall outside [lo, hi].

    Each pixel v stays inside up to a = hi / v (v > 0) or lo / v (v < 0), and pixels at 0 (the
    dataset mean) for any a; the chosen a is the `clip_fraction` quantile of those limits. Nothing
    but the reconstruction and the valid range enters.
    """
    v = images.detach().double()
    lo_b, hi_b = lo.double().expand_as(v[0]), hi.double().expand_as(v[0])
    lo_b, hi_b = lo_b.expand_as(v), hi_b.expand_as(v)
    limit = torch.full_like(v, float("inf"))
    pos, neg = v > 0, v < 0
    limit[pos] = hi_b[pos] / v[pos]
    limit[neg] = lo_b[neg] / v[neg]
    flat = limit.flatten()
    finite = flat[torch.isfinite(flat)]
    if finite.numel() == 0:  # an all-zero image: any scale keeps it inside
        return 1.0
    # the k-th smallest limit with k = floor(clip_fraction * numel): k pixels clip at most
    k = int(clip_fraction * flat.numel())
    k = min(k, finite.numel() - 1)
    # just below that pixel's own limit, so rounding does not push it out as well
    return float(torch.sort(finite).values[k]) * (1 - 1e-6)
