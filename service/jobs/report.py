"""Human-facing outputs of a job: the truth-vs-reconstruction grid and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.attacks import AttackResult
from service.specs import JobSpec

MIN_TILE = 96  # small images are upscaled (nearest) so a person can see them
PAD = 4


def _tile(img: torch.Tensor, side: int) -> Image.Image:
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
    return pil.resize((side, side * pil.height // pil.width), Image.Resampling.NEAREST)


def render_grid_png(
    recon: torch.Tensor, truth: torch.Tensor | None = None, assignment: Sequence[int] | None = None
) -> bytes:
    """One row of reconstructions, under a row of the matched ground truth when there is one.

    `assignment[i]` is the reconstruction matched to truth image i (the scoring's Hungarian
    assignment), so each column shows a pair the metrics compared.
    """
    n, _, h, w = recon.shape
    side = max(w, MIN_TILE)
    rows: list[list[torch.Tensor]] = []
    if truth is not None:
        order = list(assignment) if assignment is not None else list(range(min(n, len(truth))))
        rows.append([truth[i] for i in range(len(order))])
        rows.append([recon[j] for j in order])
    else:
        rows.append(list(recon))
    cols = max(len(r) for r in rows)
    tile_h = side * h // w
    canvas = Image.new("RGB", (cols * (side + PAD) + PAD, len(rows) * (tile_h + PAD) + PAD), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas.paste(_tile(img, side), (PAD + c * (side + PAD), PAD + r * (tile_h + PAD)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render_report_html(
    spec: JobSpec,
    result: AttackResult,
    metrics: dict[str, Any] | None,
    grid_png: bytes,
    estimate: dict[str, Any] | None = None,
) -> str:
    from service.verdict.render import render_estimate_html

    grid = base64.b64encode(grid_png).decode()
    rows = ""
    if metrics is not None:
        for name in ("psnr", "ssim", "lpips", "mse"):
            mean = metrics.get("mean", {}).get(name)
            worst = metrics.get("worst_case", {}).get(name)
            rows += f"<tr><td>{name}</td><td>{_fmt(mean)}</td><td>{_fmt(worst)}</td></tr>"
        if metrics.get("label_accuracy") is not None:
            acc = metrics["label_accuracy"]
            rows += (
                f"<tr><td>label accuracy</td><td>{_fmt(acc['multiset'])} (multiset)</td>"
                f"<td>{_fmt(acc['positional'])} (per image)</td></tr>"
            )
        if metrics.get("lpips_unavailable"):
            rows += f"<tr><td colspan=3>LPIPS unavailable: {_fmt(metrics['lpips_unavailable'])}</td></tr>"
        table = f"<table><tr><th>metric</th><th>mean</th><th>worst case (most leaked)</th></tr>{rows}</table>"
    else:
        table = "<p>No ground truth was given, so no reconstruction metric was computed.</p>"
    caption = (
        "top: the client's images; bottom: reconstructions" if metrics is not None else "reconstructions"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradleak report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}}</style>
</head><body>
<h1>gradleak leakage report</h1>
<p>Attack <b>{_fmt(spec.attack.name)}</b> on <b>{_fmt(spec.model.arch)}</b>, knowledge level
{int(spec.knowledge)}, {result.iterations} iterations ({_fmt(result.stop_reason)}),
best attack loss {_fmt(result.best_loss)}, labels {_fmt(result.labels.tolist())}.</p>
<figure><img alt="reconstruction grid" src="data:image/png;base64,{grid}">
<figcaption>{caption}</figcaption></figure>
{table}
{render_estimate_html(estimate)}
</body></html>
"""
