"""Score a reconstruction against the client's ground truth: match once, then every metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from service.errors import MetricUnavailableError
from service.metrics.catalog import METRICS, MetricOptions
from service.metrics.checks import check_pair
from service.metrics.image import PSNR_CAP_DB
from service.metrics.labels import label_accuracy
from service.metrics.matching import MATCHING_RULE, match_reconstructions

# The single "most leaked image" is chosen by PSNR, the metric the matching cost (MSE) ranks by.
WORST_CASE_BY = "psnr"


def _worst_case_rule() -> str:
    parts = [
        f"{'highest' if m.higher_is_more_leak else 'lowest'} {name}"
        for name, m in METRICS.items()
        if m.per_image is not None
    ]
    return f"most leaked image per metric ({', '.join(parts)}); image = the most leaked by {WORST_CASE_BY}"


def score(
    recon: torch.Tensor,
    truth: torch.Tensor,
    recon_labels: Sequence[int] | None = None,
    true_labels: Sequence[int] | None = None,
    lpips_weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    lpips_net: str = "alex",
) -> dict[str, Any]:
    """Every metric of a reconstruction batch against the ground truth, as JSON-ready values.

    ``recon`` and ``truth`` are (N, C, H, W) images in [0, 1]. The reconstructions are matched to
    the ground truth once (MATCHING_RULE); ``permutation[i]`` is the reconstruction paired with
    ground-truth image i and every per-image list is in ground-truth order. ``recon_labels[j]``
    belongs to reconstruction j. ``worst_case`` holds the most leaked value of each metric and
    the ground-truth index it came from. A metric that cannot be computed here is null in
    ``per_image``, ``mean`` and ``worst_case``, and ``<name>_unavailable`` says why (LPIPS without
    its weights, SSIM or LPIPS on images too small for them). PSNR is capped at PSNR_CAP_DB.
    ``device`` is where LPIPS runs (default: the images' device).
    """
    r, t = check_pair(recon, truth)
    n = r.shape[0]
    permutation = match_reconstructions(r, t)
    matched = r[permutation]
    labels: dict[str, float] | None = None
    if recon_labels is not None and true_labels is not None:
        if len(recon_labels) != n or len(true_labels) != n:
            raise ValueError(
                f"{len(recon_labels)} reconstructed and {len(true_labels)} true labels for {n} images"
            )
        labels = label_accuracy(recon_labels, true_labels, permutation)
    options = MetricOptions(lpips_weights_dir=lpips_weights_dir, lpips_net=lpips_net, device=device)

    per_image: dict[str, list[float] | None] = {}
    mean: dict[str, float | None] = {}
    worst: dict[str, Any] = {}
    most_leaked: dict[str, int | None] = {}
    unavailable: dict[str, str] = {}
    for name, metric in METRICS.items():
        if metric.per_image is None:
            continue
        try:
            values = [float(v) for v in metric.per_image(matched, t, options).cpu().tolist()]
        except MetricUnavailableError as e:
            per_image[name] = mean[name] = worst[name] = most_leaked[name] = None
            unavailable[f"{name}_unavailable"] = str(e)
            continue
        per_image[name] = values
        mean[name] = sum(values) / n
        pick = max if metric.higher_is_more_leak else min
        i = pick(range(n), key=values.__getitem__)
        worst[name], most_leaked[name] = values[i], i

    image = most_leaked[WORST_CASE_BY]
    assert image is not None  # PSNR is defined for every checked pair

    return {
        "num_images": n,
        "matching": MATCHING_RULE,
        "permutation": permutation,
        "psnr_cap_db": PSNR_CAP_DB,
        "lpips_net": lpips_net,
        "per_image": per_image,
        "mean": mean,
        "worst_case": {
            "rule": _worst_case_rule(),
            "image": image,
            "reconstruction": permutation[image],
            **worst,
            "image_by_metric": most_leaked,
        },
        "label_accuracy": labels,
        **unavailable,
    }
