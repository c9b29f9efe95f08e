"""The one rule that pairs reconstructions with ground-truth images, for every metric."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from service.metrics.checks import check_pair

MATCHING_RULE = "hungarian assignment on per-pair MSE of [0, 1] pixels"


def pairwise_mse(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N, N) float64: entry [i, j] is the MSE between ground truth i and reconstruction j."""
    r, t = check_pair(recon, truth)
    rf, tf = r.flatten(1), t.flatten(1)
    sq = (tf * tf).sum(1, keepdim=True) + (rf * rf).sum(1) - 2.0 * tf @ rf.T
    return sq.clamp_min(0.0) / tf.shape[1]


def match_reconstructions(recon: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """The assignment of reconstructions to ground-truth images with the least total MSE:
    ``permutation[i]`` is the reconstruction matched to ground-truth image i, so
    ``recon[permutation]`` lines up with ``truth``."""
    cost = pairwise_mse(recon, truth).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    order = rows.argsort()
    return [int(c) for c in cols[order]]
