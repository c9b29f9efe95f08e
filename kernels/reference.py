"""Plain-torch gradient matching and total variation: the specification of every kernel in this
package and the path used on CPU tensors.

Notation. An attack compares the gradients of a reconstruction, the *candidate* c = (c_1..c_L),
with the client's, the *target* t = (t_1..t_L), layer by layer, with one non-negative weight w_l
per layer. Three per-layer statistics carry everything the losses need:

    dot_l = <c_l, t_l>      cc_l = ||c_l||^2      dd_l = ||c_l - t_l||^2      (tt_l = ||t_l||^2)

dd_l is summed directly rather than expanded as cc - 2 dot + tt: near convergence c ~ t and the
expansion cancels catastrophically.

Costs (`matching_loss_from_statistics` is the one definition; the Triton finalisation mirrors it;
l2 needs only dd, the cosines only dot and cc, and only those are computed here):

- ``"l2"`` (DLG):               sum_l w_l dd_l
- ``"cosine"`` (per layer):     sum_l w_l (1 - dot_l / max(|c_l| |t_l|, eps))
- ``"cosine_global"`` (Inverting Gradients, weighted):
                                1 - S_dot / max(sqrt(S_cc) sqrt(S_tt), eps)
  with S_dot = sum_l w_l dot_l, S_cc = sum_l w_l cc_l and S_tt = sum_l w_l tt_l.

Epsilon handling. The norm product is clamped from below, ``max(|c||t|, eps)``, instead of the
``|c||t| + eps`` of the papers: identical wherever the product is well above eps, and where it
is not (a zero-norm layer on either side) the cosine term stays finite with finite gradients. A
zero target layer contributes the constant w_l (cosine 0) and no gradient; a zero candidate layer
contributes w_l and the bounded gradient -w_l t_l / eps. The candidate norm is computed as
sqrt(max(cc, TINY)) so that its derivative never evaluates 1/sqrt(0); gradients follow torch's
clamp convention (no gradient through a clamp that is active or exactly at its bound). The
Triton kernels implement these derivatives in closed form and are tested against autograd on
this module.

Precision. Statistics and losses are accumulated in float32 for float32/bfloat16/float16 inputs
and in float64 for float64 inputs (`accumulation_dtype`); losses are returned in that dtype and
gradients w.r.t. the candidate come back in the candidate's dtype.

Batched form. For R restarts sharing one target, candidate tensors have shape (R, *shape_l) and
every statistic and loss gains a leading R dimension; restart r's loss equals the unbatched loss
of its slice.

Total variation (Inverting Gradients' image prior) of x of shape (N, C, H, W):
mean |x[..., :, 1:] - x[..., :, :-1]| + mean |x[..., 1:, :] - x[..., :-1, :]|; a direction with a
single pixel has no neighbours and contributes 0 (not the NaN of a mean over nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

Cost = Literal["l2", "cosine", "cosine_global"]
COSTS: tuple[Cost, ...] = ("l2", "cosine", "cosine_global")

# Smallest normal float32, used for both accumulation dtypes so that fp32 and fp64 runs share one
# definition; it only matters for candidate layers whose squared norm is below it.
TINY = float(torch.finfo(torch.float32).tiny)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Statistics(NamedTuple):
    """Per-layer statistics, each of shape (R, L) (R = 1 when not batched), in the accumulation
    dtype. A cost needs only some of them (`needed`); the others are None."""

    dot: torch.Tensor | None
    cc: torch.Tensor | None
    dd: torch.Tensor | None

    @staticmethod
    def needed(cost: Cost) -> tuple[bool, bool, bool]:
        """Which of (dot, cc, dd) `cost` uses."""
        return (False, False, True) if cost == "l2" else (True, True, False)


def layer_statistics(
    candidate: Sequence[torch.Tensor], target: Sequence[torch.Tensor], *, batched: bool, cost: Cost
) -> Statistics:
    """The statistics `cost` needs. `candidate[l]` has the shape of `target[l]`, with a leading
    R dimension when `batched`."""
    need_dot, need_cc, need_dd = Statistics.needed(cost)
    acc = accumulation_dtype(candidate[0].dtype)
    dots, ccs, dds = [], [], []
    for c, t in zip(candidate, target, strict=True):
        rows = c.reshape(c.shape[0] if batched else 1, -1).to(acc)
        t_row = t.reshape(1, -1).to(acc)
        if need_dot:
            dots.append((rows * t_row).sum(dim=1))
        if need_cc:
            ccs.append((rows * rows).sum(dim=1))
        if need_dd:
            diff = rows - t_row
            dds.append((diff * diff).sum(dim=1))
    return Statistics(*(torch.stack(values, dim=1) if values else None for values in (dots, ccs, dds)))


def target_sq_norms(target: Sequence[torch.Tensor]) -> torch.Tensor:
    """tt_l = ||t_l||^2 as a vector of length L (summed in float64, stored in the accumulation dtype)."""
    acc = accumulation_dtype(target[0].dtype)
    return torch.stack([t.detach().double().square().sum() for t in target]).to(acc)


def matching_loss_from_statistics(
    cost: Cost, stats: Statistics, tt: torch.Tensor, weights: torch.Tensor, eps: float
) -> torch.Tensor:
    """The loss of each restart, shape (R,), from `stats` and tt and weights of shape (L,).
    Differentiable in the statistics, with the conventions in the module docstring."""
    if cost == "l2":
        if stats.dd is None:
            raise ValueError("the l2 cost needs the dd statistic")
        return (weights * stats.dd).sum(dim=1)
    dot, cc = stats.dot, stats.cc
    if dot is None or cc is None:
        raise ValueError(f"the {cost} cost needs the dot and cc statistics")
    if cost == "cosine":
        norm_c = cc.clamp_min(TINY).sqrt()
        denom = (norm_c * tt.sqrt()).clamp_min(eps)
        return (weights * (1.0 - dot / denom)).sum(dim=1)
    if cost == "cosine_global":
        s_dot = (weights * dot).sum(dim=1)
        s_cc = (weights * cc).sum(dim=1)
        s_tt = (weights * tt).sum()
        denom = (s_cc.clamp_min(TINY).sqrt() * s_tt.sqrt()).clamp_min(eps)
        return 1.0 - s_dot / denom
    raise ValueError(f"unknown cost {cost!r}; valid: {', '.join(COSTS)}")


def batched_gradient_matching_loss(
    candidate: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    *,
    cost: Cost,
    weights: torch.Tensor,
    eps: float,
    sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss per restart, shape (R,): candidate[l] is (R, *target[l].shape).

    `weights` has one entry per layer; `sq_norms` (tt) may be given when already known.
    """
    stats = layer_statistics(candidate, target, batched=True, cost=cost)
    acc = accumulation_dtype(candidate[0].dtype)
    tt = target_sq_norms(target) if sq_norms is None else sq_norms
    return matching_loss_from_statistics(cost, stats, tt.to(acc), weights.to(acc), eps)


def gradient_matching_loss(
    candidate: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    *,
    cost: Cost,
    weights: torch.Tensor,
    eps: float,
    sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss between equally shaped candidate and target lists (see module docstring)."""
    stats = layer_statistics(candidate, target, batched=False, cost=cost)
    acc = accumulation_dtype(candidate[0].dtype)
    tt = target_sq_norms(target) if sq_norms is None else sq_norms
    return matching_loss_from_statistics(cost, stats, tt.to(acc), weights.to(acc), eps)[0]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute horizontal plus mean absolute vertical difference of x (N, C, H, W), as a
    scalar in the accumulation dtype."""
    xa = x.to(accumulation_dtype(x.dtype))
    dx = (xa[..., :, 1:] - xa[..., :, :-1]).abs()
    dy = (xa[..., 1:, :] - xa[..., :-1, :]).abs()
    # sum / count rather than mean: an empty direction gives 0, still attached to the graph
    return dx.sum() / max(dx.numel(), 1) + dy.sum() / max(dy.numel(), 1)
