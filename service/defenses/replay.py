"""The defenses replayed on an attacker's trial gradients (the defense-adaptive attack, GGL).

An attacker who knows (or sees) that the update was clipped, sparsified, quantised or
sign-compressed applies the same post-processing to the gradient of its candidate images before
matching, so that a candidate equal to the client's data matches exactly. The replays compute the
same values as the registered defenses (service.defenses: `topk`, `clip`, `quantize` with nearest
rounding, `sign`) but are written for the attack's inner loop: they act on a list of tensors,
compose with torch.func.vmap (no .item()), and keep a gradient (the rounding steps pass it
straight through, as the identity), so a first-order attack can optimise through them.

Not replayed: additive noise (its draws are unknown; zero-mean noise adds only a constant to the
expected L2 cost, so the minimiser is unchanged) and stochastic quantisation, which is unbiased
(E[q(x)] = x), so its expectation is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.specs import ClipDefense, DefenseSpec, QuantizeDefense, SignDefense, TopKDefense

Trial = list[Tensor]


def replay_topk(trial: Sequence[Tensor], ratio: float) -> Trial:
    """Keep the round(ratio * n) largest-magnitude entries of each tensor (at least one)."""
    out = []
    for x in trial:
        flat = x.reshape(-1)
        k = max(1, round(ratio * flat.numel()))
        threshold = flat.abs().topk(k).values[-1]
        out.append(x * (x.abs() >= threshold).to(x.dtype))
    return out


def replay_clip(trial: Sequence[Tensor], max_norm: float, scale: float) -> Trial:
    """Clip as the client clipped its update, which is `scale` times the trial gradient: the
    factor min(1, max_norm / ||scale * g||) over all tensors."""
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in trial)) * abs(scale)  # type: ignore[arg-type]
    factor = torch.clamp(max_norm / (norm + 1e-30), max=1.0).to(trial[0].dtype)
    return [x * factor for x in trial]


def _straight_through(x: Tensor, value: Tensor) -> Tensor:
    """`value` forward, the identity's gradient backward."""
    return x + (value - x).detach()


def replay_quantize(trial: Sequence[Tensor], bits: int) -> Trial:
    """QSGD with nearest rounding per tensor: ||x|| * sign(x) * round(|x| / ||x|| * s) / s."""
    levels = 2**bits - 1
    out = []
    for x in trial:
        norm = torch.linalg.vector_norm(x)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        q = safe * x.sign() * (x.abs() / safe * levels).clamp(0, levels).round() / levels
        out.append(_straight_through(x, q))
    return out


def replay_sign(trial: Sequence[Tensor]) -> Trial:
    """Scaled signSGD: sign(x) * mean(|x|) per tensor."""
    return [_straight_through(x, x.sign() * x.abs().mean()) for x in trial]


@dataclass
class Replay:
    """The defenses an attack replays on its trial gradients, and what it left out and why."""

    steps: list[DefenseSpec] = field(default_factory=list)
    update_scale: float | None = 1.0
    skipped: list[str] = field(default_factory=list)

    def __call__(self, trial: list[Tensor]) -> list[Tensor]:
        for d in self.steps:
            if isinstance(d, TopKDefense):
                trial = replay_topk(trial, d.ratio)
            elif isinstance(d, ClipDefense):
                assert self.update_scale is not None
                trial = replay_clip(trial, d.max_norm, self.update_scale)
            elif isinstance(d, QuantizeDefense):
                trial = replay_quantize(trial, d.bits)
            elif isinstance(d, SignDefense):
                trial = replay_sign(trial)
        return trial

    def describe(self) -> list[str]:
        return [d.name for d in self.steps]


def plan_replay(defenses: Sequence[DefenseSpec], update_scale: float | None) -> Replay:
    """The replay of `defenses` (in their order) on trial gradients of the target's scale:
    `update_scale` is how much larger the shared update is than the target (None: unknown)."""
    plan = Replay(update_scale=update_scale)
    for d in defenses:
        if isinstance(d, QuantizeDefense) and d.stochastic:
            plan.skipped.append("quantize: stochastic rounding is unbiased, its expectation is the identity")
        elif isinstance(d, ClipDefense) and update_scale is None:
            plan.skipped.append(
                "clip: the update's scale (lr x steps) is unknown; "
                "the scale-free cost ignores a global factor"
            )
        elif isinstance(d, TopKDefense | ClipDefense | QuantizeDefense | SignDefense):
            plan.steps.append(d)
        else:
            plan.skipped.append(
                f"{d.name}: not replayed (zero-mean noise adds a constant to the expected L2 cost)"
            )
    return plan


def detect_topk(target: Sequence[Tensor], min_size: int = 10, densest: float = 0.9) -> float | None:
    """The ratio of a per-tensor top-k sparsification seen in an update's zero pattern, or None.

    Top-k keeps round(ratio * n) entries of every tensor, so the update shows it when every tensor
    of at least `min_size` entries (and at least two of them) keeps a share of non-zeros within
    rounding (0.5 / n) of one common ratio, at most `densest`. A gradient's own exact zeros (dead
    ReLUs) do not show that signature across all layers.
    """
    sized = [(float((t != 0).sum()) / t.numel(), t.numel()) for t in target if t.numel() >= min_size]
    if len(sized) < 2:
        return None
    lo = max(share - 0.5 / n for share, n in sized)
    hi = min(share + 0.5 / n for share, n in sized)
    shares = [share for share, _ in sized]
    if max(shares) > densest or min(shares) == 0 or lo > hi + 1e-9:
        return None
    return sum(shares) / len(shares)
