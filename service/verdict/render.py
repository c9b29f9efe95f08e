"""The estimate as an HTML section of report.html (self-contained; every value escaped), with two
pictures: how the PSNR estimate was made (render_estimate_png) and the shadows' proxy images above
their reconstructions (shadows_png)."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

from service.verdict.estimate import EXACT_DB, METRICS, SCOPES

if TYPE_CHECKING:
    from service.verdict.shadows import Shadow


def _num(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.3g}{unit}" if isinstance(v, float) else html.escape(str(v))


def render_estimate_png(estimate: dict[str, Any]) -> bytes | None:
    """Worst-case PSNR against the attack's final matching loss: each shadow where its attack ended,
    moved along the fixed line to the real attack's loss, the weighted estimate there with its
    interval, the no-leak floor and the exactness ceiling. None without a PSNR estimate."""
    psnr = estimate.get("psnr", {}).get("worst_case")
    losses = estimate.get("shadow_losses") or []
    if not psnr or len(losses) != len(psnr["shadows"]) or not all(x > 0 for x in losses):
        return None
    from matplotlib.figure import Figure

    real = estimate.get("real_loss")
    at = real if real is not None and real > 0 else math.exp(sum(math.log(x) for x in losses) / len(losses))
    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    ax = fig.subplots()
    moved = psnr.get("shadows_moved") or psnr["shadows"]
    for i, (x, y, m) in enumerate(zip(losses, psnr["shadows"], moved, strict=True)):
        ax.plot([x, at], [y, m], color="#9aa9c8", lw=1, ls="--", zorder=1)
        ax.scatter([x], [y], color="#3b5ba9", s=28, zorder=3, label="shadow audits" if i == 0 else None)
        ax.scatter([at], [m], facecolors="none", edgecolors="#3b5ba9", s=28, zorder=3)
    lo, hi = psnr["interval"]
    value = psnr["value"]
    direct = psnr.get("source") == "direct"
    if direct and psnr.get("shadow_value") is not None:
        s_lo, s_hi = psnr.get("shadow_interval") or (psnr["shadow_value"],) * 2
        sv = psnr["shadow_value"]
        ax.errorbar(
            [at], [sv], yerr=[[sv - s_lo], [s_hi - sv]], fmt="D", color="#9aa9c8", ms=6, capsize=4,
            lw=1, zorder=3, label=f"the shadows alone {sv:.1f} dB",
        )  # fmt: skip
    what = "direct estimate (Gauss-Newton step)" if direct else "estimate"
    ax.errorbar(
        [at], [value], yerr=[[value - lo], [hi - value]], fmt="D", color="#c0392b", ms=7, capsize=5,
        lw=2, zorder=4, label=f"{what} {value:.1f} dB [{lo:.1f}, {hi:.1f}]",
    )  # fmt: skip
    if real is not None:
        ax.axvline(real, color="#c0392b", lw=1, alpha=0.5, label="the real attack's loss")
    floor = (estimate.get("floor") or {}).get("psnr", {}).get("worst_case")
    if floor is not None:
        ax.axhline(floor, color="#777", lw=1, ls=":", label=f"no-leak floor {floor:.1f} dB")
    top = max(hi, *psnr["shadows"], *moved, psnr.get("shadow_value") or 0.0)
    if top >= EXACT_DB - 5:
        ax.axhline(EXACT_DB, color="#2e7d32", lw=1, ls="-.", label=f"{EXACT_DB:g} dB: exact")
    ax.set_xscale("log")
    ax.set_xlabel("attack's final matching loss")
    ax.set_ylabel("worst-case PSNR (dB)")
    ax.set_title("How the estimate was made", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    src = "data:image/png;base64," + base64.b64encode(png).decode()
    return (
        f'<figure><img alt="{html.escape(alt)}" src="{src}">'
        f"<figcaption class=note>{html.escape(caption)}</figcaption></figure>"
    )


def render_estimate_html(estimate: dict[str, Any] | None, shadows_png: bytes | None = None) -> str:
    """A <section> with the estimate, its intervals, the gain over the no-leak floor, the label
    histogram and the two pictures (the shadows' grid when given); empty when there is no estimate."""
    if not estimate:
        return ""
    rows = ""
    for metric in METRICS:
        if metric not in estimate:
            continue
        unit = " dB" if metric == "psnr" else ""
        for scope in SCOPES:
            e = estimate[metric][scope]
            lo, hi = e["interval"]
            value = _num(e["value"], unit)
            if e.get("exact"):
                value = f"at least {EXACT_DB:g} dB: exact ({value}, indicative)"
            source = "shadows"
            if e.get("source") == "direct":
                source = f"direct (the shadows alone: {_num(e.get('shadow_value'), unit)})"
            rows += (
                f"<tr><td>{metric}</td><td>{scope.replace('_', ' ')}</td><td>{value}</td><td>{source}</td>"
                f"<td>[{_num(lo)}, {_num(hi)}]</td><td>{_num(e.get('gain_over_floor'), unit)}</td>"
                f"<td>{_num(estimate['floor'][metric][scope], unit)}</td></tr>"
            )
    labels = estimate["labels"]
    counts = ", ".join(f"class {html.escape(k)}: {v}" for k, v in labels["counts"].items())
    unavailable = "".join(
        f"<p>{html.escape(m)} unavailable: {html.escape(why)}</p>"
        for m, why in estimate.get("unavailable", {}).items()
    )
    plot = _figure(
        render_estimate_png(estimate),
        "worst-case PSNR of the shadow audits against their matching loss, and the estimate",
        "Each shadow audit (filled) where its attack ended, moved along the fixed line to the real "
        "attack's loss (hollow); the estimate is their weighted mean there, with its interval (or, "
        "where a Gauss-Newton step on the real attack's residual holds, the direct estimate, with "
        "the shadows' beside it).",
    )
    grid = _figure(
        shadows_png,
        "the shadows' proxy images and their reconstructions",
        "Each shadow's most leaked proxy image (top) and the reconstruction the same attack made "
        "of it (below): what the estimate is made of.",
    )
    return f"""<section id="estimate"><h2>Leakage estimate (without the client's images)</h2>
<p>{html.escape(estimate.get("summary", ""))}. {estimate["shadows_run"]} shadow audits on
{html.escape(estimate["proxy_data"])}; method: {html.escape(estimate["method"])}.</p>
<table><tr><th>metric</th><th>over</th><th>estimate</th><th>from</th><th>interval</th><th>gain over floor</th>
<th>no-leak floor</th></tr>{rows}</table>{unavailable}
<p>Labels the update reveals ({html.escape(labels["certainty"])}): {counts}. {html.escape(labels["why"])}.</p>
{plot}{grid}</section>"""


def shadows_png(shadows: list[Shadow]) -> bytes:
    """A column per shadow: its most leaked proxy image above the reconstruction matched to it, with
    their PSNR and SSIM, the shadow that leaked most framed (service.jobs.report's grid)."""
    import torch

    from service.jobs.report import render_grid_png

    truth, recon, psnr, ssim = [], [], [], []
    for s in shadows:
        m = s.metrics
        i = m["worst_case"]["image"]
        truth.append(s.images[i])
        recon.append(s.reconstruction[m["permutation"][i]])
        psnr.append(m["per_image"]["psnr"][i])
        ssim.append(None if m["per_image"].get("ssim") is None else m["per_image"]["ssim"][i])
    most = max(range(len(shadows)), key=lambda k: psnr[k])
    metrics = {
        "per_image": {"psnr": psnr, "ssim": ssim},
        "permutation": list(range(len(shadows))),
        "worst_case": {"image": most},
    }
    return render_grid_png(
        torch.stack(recon),
        torch.stack(truth),
        metrics,
        row_names={
            "truth": ("proxy images", "(shadow clients)"),
            "recon": ("reconstructed", "by the attack"),
        },
        column_heads=[f"shadow {k}" for k in range(len(shadows))],
    )
