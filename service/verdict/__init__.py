"""A leakage verdict for an update without the client's images.

`estimate_leakage` runs K shadow audits on proxy data (service.verdict.shadows), turns their
scores into an estimate with an interval refined by the real attack's final matching loss
(service.verdict.estimate), states the label histogram the update reveals and how sure that is
(service.verdict.histogram), and scores trivial reconstructions (the proxy mean image, the
attack's starting point) as a no-leak floor, so every PSNR/SSIM is also read as its gain over it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.attacks import AttackProblem, AttackResult
from service.attacks.base import random_images
from service.data import normalize
from service.jobs.budget import batch_within_memory
from service.jobs.types import JobContext, Progress
from service.metrics import score
from service.specs import SOURCE_ARCHS, JobSpec
from service.verdict.estimate import (
    DIRECT_FLOOR,
    EXACT_DB,
    HALF_WIDTH_FLOOR,
    METRICS,
    SCOPES,
    SLOPE_EXACT,
    SLOPE_PARTIAL,
    SPREAD_C,
    apply_direct,
    combine,
    psnr_spread_multiple,
    spread_factor,
)
from service.verdict.histogram import label_histogram
from service.verdict.newton import LocalEstimate, local_estimate
from service.verdict.render import shadows_png
from service.verdict.shadows import (
    Shadow,
    ShadowProgress,
    attack_shadows,
    draw_images,
    make_shadow,
    proxy_pool,
    shadow_training,
)

__all__ = ["estimate_leakage", "no_leak_floor"]

DIRECT_TIME_SHARE = 1.0  # the direct estimate's steps may take this share of the shadow audits' time
DIRECT_MIN_S = 30.0  # and at least this many seconds

METHOD = (
    "K shadow clients like the real one (model, declared training, defenses, image count, label "
    "histogram) on proxy images, attacked like it and scored; PSNR estimate = the mean of the "
    "shadows' PSNRs (weighted by how near their loss is to the real one), each moved to the real "
    "attack's final matching loss along a fixed line "
    f"({SLOPE_EXACT:g} dB per e-fold of loss for a shadow at or above {EXACT_DB:g} dB, "
    f"{SLOPE_PARTIAL:g} below); interval = +- max({HALF_WIDTH_FLOOR['psnr']:g} dB, "
    f"{SPREAD_C:g} x t x sqrt(1 + 1/K) x the moved PSNRs' sd, t the two-sided 90 % Student "
    f"quantile); at or above {EXACT_DB:g} dB the reconstruction is exact (the dB figure is "
    "indicative); SSIM/LPIPS: the shadows' mean moved by r^2 along their own line of score against log loss. "
    "Direct estimate, where it holds: one Gauss-Newton step on the real attack's residual estimates its "
    "error, and the reconstruction scored against the images it implies is the estimate of every metric "
    f"(interval +- max({DIRECT_FLOOR['psnr']:g} dB, t x the RMS of the same estimate's errors on the "
    "shadows where it held)"
)


def mean_scores(scores: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per metric and scope (mean, worst case), the mean of `score` results (None where any lacks it)."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        out[metric] = {}
        for scope in SCOPES:
            values = [s[scope].get(metric) for s in scores]
            out[metric][scope] = None if any(v is None for v in values) else sum(values) / len(values)
    return out


def no_leak_floor(
    baselines: dict[str, torch.Tensor], targets: list[torch.Tensor], lpips_weights_dir: str | None = None
) -> dict[str, Any]:
    """Per metric and scope, the most leaky score of any trivial reconstruction (no information from
    the update) against the target batches, and which baseline gave it."""
    by_baseline = {}
    for name, image in baselines.items():
        scored = [
            score(image.expand_as(t).contiguous(), t, lpips_weights_dir=lpips_weights_dir)
            if image.dim() == 3
            else score(image, t, lpips_weights_dir=lpips_weights_dir)
            for t in targets
        ]
        by_baseline[name] = mean_scores(scored)
    floor: dict[str, Any] = {"baselines": by_baseline, "by": {}}
    for metric in METRICS:
        floor[metric] = {}
        for scope in SCOPES:
            candidates = [
                (b[metric][scope], n) for n, b in by_baseline.items() if b[metric][scope] is not None
            ]
            if not candidates:
                floor[metric][scope] = None
                continue
            pick = min if metric == "lpips" else max
            value, name = pick(candidates)
            floor[metric][scope] = value
            floor["by"][metric] = name
    return floor


def _gain(metric: str, value: float | None, floor: float | None) -> float | None:
    if value is None or floor is None:
        return None
    return floor - value if metric == "lpips" else value - floor


def estimate_leakage(
    spec: JobSpec,
    model: nn.Module,
    problem: AttackProblem,
    result: AttackResult,
    truth_images: torch.Tensor | None,
    metrics: dict[str, Any] | None,
    ctx: JobContext,
    device: torch.device,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """The verdict on the real update (the manifest's `estimate`; deterministic for verdict.seed),
    and the picture of the shadows' proxy images above their reconstructions (for the report).
    `progress` hears every iteration of the shadow audits: give it a throttled listener (the
    runner passes its emitter's `throttled`)."""
    started = time.monotonic()
    v = spec.verdict
    n = problem.num_images
    c, h, w = spec.data.shape
    histogram = label_histogram(spec, problem)
    labels = torch.tensor(histogram["labels"], dtype=torch.long)
    pool, proxy_source = proxy_pool(spec, ctx.resolve)
    training, assumed = shadow_training(spec, n)
    draw = torch.Generator().manual_seed(v.seed)

    clients = [
        make_shadow(spec, model, draw_images(pool, n, draw), labels, training, k, ctx, device)
        for k in range(v.shadows)
    ]
    module = problem.model if spec.model.arch in SOURCE_ARCHS else None
    per_batch = batch_within_memory(
        clients[0].spec, v.shadows, ctx.memory_limit_bytes, problem.num_images, module=module
    )
    shadows_started = time.monotonic()
    shadows, execution = attack_shadows(
        clients, ctx, device, progress=_shadow_progress(progress), per_batch=per_batch
    )
    # the direct estimate's steps may take a share of what the shadow audits took
    deadline = time.monotonic() + max(DIRECT_MIN_S, DIRECT_TIME_SHARE * (time.monotonic() - shadows_started))

    def seconds_left() -> float:
        if ctx.should_stop is not None and ctx.should_stop():
            return 0.0
        return deadline - time.monotonic()

    if ctx.should_stop is not None and ctx.should_stop():
        shadows = []  # stopped part-way: no estimate from attacks cut short
    shadow_scores = [{"loss": s.loss, "metrics": s.metrics} for s in shadows]

    real_loss = result.best_loss if math.isfinite(result.best_loss) else None
    estimates, unavailable = combine(shadow_scores, real_loss) if len(shadows) >= 2 else ({}, {})
    direct = None
    if shadows:
        direct, scores, errors = direct_estimate(
            problem, result, shadows, ctx.lpips_weights_dir, device, seconds_left
        )
        if scores is not None:
            apply_direct(estimates, scores, errors)

    start = random_images((n, c, h, w), getattr(spec.attack, "init", "randn"), draw, torch.device("cpu"))
    baselines = {
        "proxy mean image": pool.mean(dim=0),
        "attack start": problem.denormalize(start.to(problem.device)).cpu(),
    }
    floor = no_leak_floor(baselines, [c.images for c in clients], ctx.lpips_weights_dir)
    for metric, scopes in estimates.items():
        for scope, est in scopes.items():
            est["gain_over_floor"] = _gain(metric, est["value"], floor[metric][scope])

    out: dict[str, Any] = {
        "method": METHOD,
        "shadows": v.shadows,
        "shadows_run": len(shadows),
        "proxy_data": proxy_source,
        "budget": (v.budget or spec.budget).model_dump(),
        "execution": execution,
        "assumed": assumed,
        "half_width_floor": HALF_WIDTH_FLOOR,
        "psnr_slopes_db_per_efold": {"exact": SLOPE_EXACT, "partial": SLOPE_PARTIAL},
        "psnr_spread_multiple": psnr_spread_multiple(max(len(shadows), 2)),
        "exact_db": EXACT_DB,
        "spread_factor": spread_factor(max(len(shadows), 2)),
        "real_loss": real_loss,
        "shadow_losses": [s.loss for s in shadows],
        **estimates,
        "unavailable": unavailable,
        "labels": {k: val for k, val in histogram.items() if k != "labels"},
        "floor": floor,
        "floor_truth": None,
        "metrics_gain": None,
        "igsa": None,
        "direct": direct,
    }
    if truth_images is not None and len(truth_images) == n:
        floor_truth = no_leak_floor(baselines, [truth_images.cpu()], ctx.lpips_weights_dir)
        out["floor_truth"] = floor_truth
        if metrics is not None:
            out["metrics_gain"] = {
                metric: {
                    scope: _gain(metric, metrics[scope].get(metric), floor_truth[metric][scope])
                    for scope in SCOPES
                }
                for metric in METRICS
            }
    if v.igsa and shadows:
        out["igsa"] = igsa_context(spec, problem, result, shadows, v.seed, device)
    out["summary"] = summary(out)
    out["elapsed_s"] = time.monotonic() - started
    return out, shadows_png(shadows) if shadows else None


def implied_scores(
    recon: torch.Tensor,
    labels: torch.Tensor,
    local: LocalEstimate,
    lpips_weights_dir: str | None,
    device: torch.device,
) -> dict[str, dict[str, float | None]]:
    """Per metric and scope, the reconstruction scored against the images a Gauss-Newton step
    implies; with declared noise, averaged over the step's draws of the error the noise leaves."""
    targets = local.noisy_images or ([local.images] if local.images is not None else [])
    y = labels.tolist()
    return mean_scores([score(recon, t, y, y, lpips_weights_dir, device=device) for t in targets])


def direct_estimate(
    problem: AttackProblem,
    result: AttackResult,
    shadows: list[Shadow],
    lpips_weights_dir: str | None,
    device: torch.device,
    seconds_left: Callable[[], float] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, float | None]] | None, dict[str, dict[str, list[float]]]]:
    """The direct estimate (service.verdict.newton) of the real reconstruction and how it fared on
    the shadows, within `seconds_left()` (a step that would not fit, or runs out, is not trusted):
    the record (`real` and `shadows`, each step's numbers; where the real step is applicable its
    estimate is recorded as `real.estimate` even when it is not trusted, so that the rules can be
    checked against cases); the real reconstruction scored against the images its step implies
    (None where the step is not trusted); and per metric and scope the same estimate's errors
    (truth - estimate) on the shadows where it was trusted too. The shadows check only a trusted
    real step."""
    real = local_estimate(problem, result.images, result.labels, seconds_left=seconds_left)
    record: dict[str, Any] = {"real": real.record(), "shadows": []}
    errors: dict[str, dict[str, list[float]]] = {m: {s: [] for s in SCOPES} for m in METRICS}
    if not real.applicable or real.images is None:
        return record, None, errors
    scores = implied_scores(result.images.detach().cpu(), result.labels, real, lpips_weights_dir, device)
    record["real"]["estimate"] = scores
    if not real.valid:
        return record, None, errors
    for s in shadows:
        local = local_estimate(s.problem, s.reconstruction, s.reconstructed_labels, seconds_left=seconds_left)
        checked = local.record()
        if local.images is not None:
            est = implied_scores(s.reconstruction, s.reconstructed_labels, local, lpips_weights_dir, device)
            checked["errors"] = {}
            for metric in METRICS:
                for scope in SCOPES:
                    truth, guess = s.metrics[scope].get(metric), est[metric][scope]
                    if truth is not None and guess is not None:
                        checked["errors"][f"{metric}_{scope}"] = truth - guess
                        if local.valid:
                            errors[metric][scope].append(truth - guess)
        record["shadows"].append(checked)
    return record, scores, errors


def _shadow_progress(progress: Callable[[Progress], None] | None) -> ShadowProgress | None:
    """The shadow audits' iterations as the job's progress (stage "scoring"; the runner throttles)."""
    if progress is None:
        return None

    def report(iteration: int, total: int, which: str) -> None:
        progress(Progress(stage="scoring", iteration=iteration, total=total, message=which))

    return report


def igsa_context(
    spec: JobSpec,
    problem: AttackProblem,
    result: AttackResult,
    shadows: list[Shadow],
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """IGSA (service.metrics.igsa, 4 perturbations) of the model around each shadow's own images,
    around each shadow's reconstruction and around the real attack's reconstruction: the smoothness
    the shadows met against the one the real update's attack met (the real images are unknown, so
    reconstructions are what compares like with like). None where IGSA is undefined (a batch whose
    gradient is zero in every layer)."""
    from service.errors import SpecError
    from service.metrics.igsa import igsa

    norm = spec.data.resolved_normalization()

    def at(images: torch.Tensor, labels: torch.Tensor) -> float | None:
        try:
            res = igsa(
                problem.model,
                normalize(images.to(device), norm),
                labels.to(device),
                samples=4,
                bn_mode=problem.bn_mode,
                generator=torch.Generator().manual_seed(seed),
            )
        except SpecError:
            return None
        return res.score

    real = at(result.images.detach(), result.labels.detach())
    on_truth = [at(s.images, s.labels) for s in shadows]
    on_recon = [at(s.reconstruction, s.reconstructed_labels) for s in shadows]
    return {
        "score": on_truth[0],  # shadow 0's proxy batch: context comparable across rounds
        "on": "shadow 0's proxy batch",
        "shadows": on_truth,
        "shadow_reconstructions": on_recon,
        "real_reconstruction": real,
    }


def summary(est: dict[str, Any]) -> str:
    """One line: the worst-case PSNR estimate, its interval and its gain over the floor; at or above
    EXACT_DB it says "at least 40 dB: exact reconstruction" first (the dB figure is indicative)."""
    psnr = est.get("psnr", {}).get("worst_case")
    if psnr is None:
        return "no estimate: the shadow audits did not finish"
    lo, hi = psnr["interval"]
    gain = psnr.get("gain_over_floor")
    above = "" if gain is None else f", {gain:+.1f} dB over the no-leak floor"
    if psnr.get("source") == "direct":
        above += "; direct: a Gauss-Newton step on the real attack's residual"
    if psnr["value"] >= EXACT_DB:
        return (
            f"estimated worst-case PSNR at least {EXACT_DB:g} dB: exact reconstruction "
            f"({psnr['value']:.1f} dB [{lo:.1f}, {hi:.1f}], indicative){above}"
        )
    return f"estimated worst-case PSNR {psnr['value']:.1f} dB [{lo:.1f}, {hi:.1f}]{above}"
