"""The estimate: what a real update leaks, from shadow audits whose truth is known.

Method (one paragraph). K shadow clients, made like the real one (same model, declared training,
defenses, image count and label histogram) but on proxy images, are attacked like it and scored
against their own images. PSNR: each shadow's score is moved along a fixed line of PSNR against
the log of the attack's final matching loss, from the shadow's own loss to the real attack's loss:
by SLOPE_EXACT (-4.0 dB per e-fold, about -10 dB per decade: near an exact reconstruction the
image error's energy is proportional to the matching loss) for a shadow reconstructed exactly
(at least EXACT_DB = 40 dB), else by SLOPE_PARTIAL (-1.1 dB per e-fold); both slopes are the
pooled within-case slopes of bench/verdict.py's calibration cases. The estimate is the mean of
the moved scores, each weighted by exp(-d^2 / 2 LOSS_WIDTH^2), d the e-folds between its loss
and the real one (LOSS_WIDTH = 2: a shadow that reached the real attack's loss needs the least
moving); the interval is +- the larger of a floor (HALF_WIDTH_FLOOR, the proxy-to-real
gap the shadows cannot see) and a Student prediction half-width of the moved scores, SPREAD_C x
t x sqrt(1 + 1/K) x their standard deviation (t the two-sided 90 % Student quantile with K - 1
degrees of freedom, so the width follows K), SPREAD_C the smallest multiple (in steps of 0.05)
that covers 85 % of the calibration cases at the default K = 5. At or above
EXACT_DB the estimate says "exact reconstruction": PSNRs up there differ by float rounding, not by
what is visible, so the verdict reads "at least 40 dB" and the dB figure is indicative only.
SSIM and LPIPS have no such pooled line: their estimate is the shadows' mean moved by r^2 along
the shadows' own least-squares line of score against log loss (no move when K < 3, the losses do
not vary, or the line says a lower loss means less leakage), clipped to their range widened by one
half-width, with +- max(floor, t x the shadows' sd about the line), t the two-sided 90 % Student
quantile with K - 1 degrees of freedom.

Direct estimate (service.verdict.newton): where one Gauss-Newton step on the real attack's final
residual is trusted by its own numbers, the reconstruction scored against the images that step
implies replaces the shadows' estimate for every metric (`source: direct`; the shadows' estimate
stays beside it as `shadow_value`). Its interval is +- the larger of DIRECT_FLOOR and t x the
root mean square of the same direct estimate's errors on the shadows where it was trusted too
(their truth is known), t the two-sided 90 % Student quantile with (that count - 1) degrees of
freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

from scipy.stats import t as student_t

# Half-width floors: the gap between proxy and real images the shadows cannot see (PSNR: chosen
# with SPREAD_C on bench/verdict.py's calibration cases; SSIM and LPIPS in proportion).
HALF_WIDTH_FLOOR: dict[str, float] = {"psnr": 3.0, "ssim": 0.12, "lpips": 0.12}
# Direct estimates' half-width floors (set by reasoning, not tuned: a PSNR figure read to the dB)
DIRECT_FLOOR: dict[str, float] = {"psnr": 1.0, "ssim": 0.02, "lpips": 0.02}
EXACT_DB = 40.0  # a reconstruction this good is exact: the verdict says "at least 40 dB"
SLOPE_EXACT = -4.0  # dB of PSNR per e-fold of matching loss, for a shadow reconstructed exactly
SLOPE_PARTIAL = -1.1  # the same below EXACT_DB (pooled within-case slopes, calibration cases)
LOSS_WIDTH = 2.0  # e-folds: shadows whose loss is near the real one weigh more (Gaussian weight)
SPREAD_C = 0.45  # PSNR half-width: max(floor, SPREAD_C x t x sqrt(1 + 1/K) x the moved scores' sd)
CONFIDENCE = 0.90  # two-sided, of the Student quantile that scales the shadows' spread
BOUNDS: dict[str, tuple[float, float]] = {"psnr": (0.0, 100.0), "ssim": (-1.0, 1.0), "lpips": (0.0, 2.0)}
METRICS = ("psnr", "ssim", "lpips")
SCOPES = ("mean", "worst_case")


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def _sd(v: Sequence[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


@cache
def spread_factor(k: int) -> float:
    """The two-sided CONFIDENCE Student quantile with k - 1 degrees of freedom."""
    return float(student_t.ppf(0.5 + CONFIDENCE / 2, max(k - 1, 1)))


def psnr_spread_multiple(k: int) -> float:
    """What multiplies the moved PSNRs' standard deviation in the interval: SPREAD_C x t x sqrt(1 + 1/K)."""
    return SPREAD_C * spread_factor(k) * math.sqrt(1 + 1 / max(k, 1))


def refine(
    values: Sequence[float], log_losses: Sequence[float], real_log_loss: float | None, metric: str
) -> dict:
    """One score's estimate and interval from the shadows' (value, log loss) pairs (module docstring)."""
    more_leak_when_higher = metric != "lpips"
    k = len(values)
    centre, spread = _mean(values), _sd(values)
    shift, r2, slope = 0.0, 0.0, None
    residual_sd = spread
    lx = _mean(log_losses) if log_losses else 0.0
    sxx = sum((x - lx) ** 2 for x in log_losses)
    if k >= 3 and real_log_loss is not None and math.isfinite(real_log_loss) and sxx > 1e-12:
        sxy = sum((x - lx) * (y - centre) for x, y in zip(log_losses, values, strict=True))
        slope = sxy / sxx
        syy = sum((y - centre) ** 2 for y in values)
        r2 = 0.0 if syy <= 1e-12 else min(1.0, sxy * sxy / (sxx * syy))
        # a lower matching loss must mean more leakage, else the relation is noise
        if (slope < 0) == more_leak_when_higher:
            shift = r2 * slope * (real_log_loss - lx)
            fitted = [centre + slope * (x - lx) for x in log_losses]
            rss = sum((y - f) ** 2 for y, f in zip(values, fitted, strict=True))
            residual_sd = math.sqrt(rss / (k - 1))
        else:
            r2 = 0.0
    half = max(HALF_WIDTH_FLOOR[metric], spread_factor(k) * residual_sd)
    lo_clip, hi_clip = min(values) - half, max(values) + half
    point = min(max(centre + shift, lo_clip), hi_clip)
    lo_b, hi_b = BOUNDS[metric]
    return {
        "value": point,
        "interval": [max(lo_b, point - half), min(hi_b, point + half)],
        "source": "shadows",
        "shadows": list(values),
        "shadow_mean": centre,
        "shadow_sd": spread,
        "loss_slope": slope,
        "loss_r2": r2,
    }


def extrapolate_psnr(
    values: Sequence[float], log_losses: Sequence[float], real_log_loss: float | None
) -> dict[str, Any]:
    """The PSNR estimate and interval from the shadows' (PSNR, log loss) pairs (module docstring)."""
    if real_log_loss is None or not math.isfinite(real_log_loss):
        moved = list(values)  # no real loss to move to: the shadows as they are, weighted alike
        weights = [1.0] * len(values)
    else:
        moved = [
            v + (SLOPE_EXACT if v >= EXACT_DB else SLOPE_PARTIAL) * (real_log_loss - x)
            for v, x in zip(values, log_losses, strict=True)
        ]
        weights = [math.exp(-0.5 * ((real_log_loss - x) / LOSS_WIDTH) ** 2) for x in log_losses]
        if sum(weights) < 1e-12:  # every shadow far from the real loss: weigh them alike
            weights = [1.0] * len(values)
    point = sum(w * m for w, m in zip(weights, moved, strict=True)) / sum(weights)
    half = max(HALF_WIDTH_FLOOR["psnr"], psnr_spread_multiple(len(moved)) * _sd(moved))
    lo_b, hi_b = BOUNDS["psnr"]
    point = min(max(point, lo_b), hi_b)
    return {
        "value": point,
        "interval": [max(lo_b, point - half), min(hi_b, point + half)],
        "exact": point >= EXACT_DB,
        "source": "shadows",
        "shadows": list(values),
        "shadows_moved": moved,
        "shadow_weights": [w / sum(weights) for w in weights],
        "shadow_mean": _mean(values),
        "shadow_sd": _sd(values),
    }


def combine(shadow_scores: list[dict[str, Any]], real_loss: float | None) -> tuple[dict, dict]:
    """Per metric and scope, the refined estimate; and what is unavailable (LPIPS without weights)."""
    logs = [math.log(max(s["loss"], 1e-30)) for s in shadow_scores]
    real_log = None if real_loss is None or real_loss <= 0 else math.log(real_loss)
    out: dict[str, dict[str, Any]] = {}
    unavailable: dict[str, str] = {}
    for metric in METRICS:
        per_scope: dict[str, Any] = {}
        for scope in SCOPES:
            values = [s["metrics"][scope].get(metric) for s in shadow_scores]
            if any(v is None for v in values):
                reason = shadow_scores[0]["metrics"].get(f"{metric}_unavailable", "not computed")
                unavailable[metric] = str(reason)
                break
            per_scope[scope] = (
                extrapolate_psnr(values, logs, real_log)
                if metric == "psnr"
                else refine(values, logs, real_log, metric)
            )
        if metric not in unavailable:
            out[metric] = per_scope
    return out, unavailable


def apply_direct(
    estimates: dict[str, dict[str, Any]],
    direct: dict[str, Any],
    shadow_errors: dict[str, dict[str, list[float]]],
) -> None:
    """Replace each metric's shadow estimate, in place, by the direct one (`direct[metric][scope]`,
    the reconstruction scored against the images the Gauss-Newton step implies), with the interval
    of the module docstring; `shadow_errors[metric][scope]` are the direct estimate's errors
    (truth - estimate) on the shadows where it was trusted."""
    for metric, scopes in estimates.items():
        for scope, est in scopes.items():
            value = direct.get(metric, {}).get(scope)
            if value is None:
                continue
            errors = shadow_errors.get(metric, {}).get(scope, [])
            half = DIRECT_FLOOR[metric]
            if len(errors) >= 2:
                rms = math.sqrt(sum(e * e for e in errors) / len(errors))
                half = max(half, spread_factor(len(errors)) * rms)
            lo_b, hi_b = BOUNDS[metric]
            est["shadow_value"], est["shadow_interval"] = est["value"], est["interval"]
            est["value"] = value
            est["interval"] = [max(lo_b, value - half), min(hi_b, value + half)]
            est["source"] = "direct"
            if metric == "psnr":
                est["exact"] = value >= EXACT_DB
