"""Human-facing outputs of a job: the labelled truth-vs-reconstruction grid and a self-contained
HTML report (images inline as data: URIs, the only images the service's CSP allows)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from service.attacks import ATTACKS, AttackResult
from service.jobs.types import REPORT_POLICY
from service.specs import JobSpec, Knowledge

MIN_TILE = 128  # small images are upscaled (nearest, whole factors) so a person can judge them
PAD = 6
LABEL_W = 118  # the row names' column
HEADER_H = 20  # a column's name above its tiles
LINE_H = 15  # one line of text under a tile
MAX_COLUMNS = 8  # more images wrap into further blocks
LEAK_COLOUR = (200, 30, 30)
TEXT_COLOUR = (20, 20, 20)
MUTED_COLOUR = (90, 90, 90)


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------


@dataclass
class GridLayout:
    """Where everything of the grid goes; `render_grid_png` draws it, tests read it."""

    width: int
    height: int
    tile: tuple[int, int]  # (width, height) of one upscaled image
    tiles: list[tuple[int, int, str, int]] = field(default_factory=list)  # x, y, "truth"|"recon", index
    texts: list[tuple[int, int, str, tuple[int, int, int]]] = field(default_factory=list)  # x, y, text, rgb
    frames: list[tuple[int, int, int, int]] = field(default_factory=list)  # the most leaked column
    most_leaked: int | None = None  # ground-truth index


def _scale(h: int, w: int) -> int:
    return max(1, math.ceil(MIN_TILE / max(h, w)))


def fmt_num(v: float | None, digits: int, unit: str = "") -> str:
    """A number to `digits` decimals, or n/a for a metric that has none (e.g. SSIM of a tiny image)."""
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def grid_layout(
    num: int,
    image_hw: tuple[int, int],
    *,
    has_truth: bool,
    metrics: dict[str, Any] | None = None,
    recon_labels: Sequence[int] | None = None,
    true_labels: Sequence[int] | None = None,
    row_names: dict[str, tuple[str, str]] | None = None,
    column_heads: Sequence[str] | None = None,
) -> GridLayout:
    """Columns are ground-truth images (with truth) or reconstructions; under each reconstruction
    its PSNR and SSIM against its matched truth, the most leaked column framed in red. `row_names`
    (two lines for "truth" and "recon") and `column_heads` replace the rows' and columns' titles."""
    h, w = image_hw
    k = _scale(h, w)
    tw, th = w * k, h * k
    per_image = (metrics or {}).get("per_image") or {}
    psnr, ssim = per_image.get("psnr"), per_image.get("ssim")
    perm = list((metrics or {}).get("permutation") or range(num))
    most = (metrics or {}).get("worst_case", {}).get("image") if metrics else None
    rows = ["truth", "recon"] if has_truth else ["recon"]
    under = {
        "truth": 1 if true_labels is not None else 0,
        "recon": (2 if metrics is not None else 0) + (1 if recon_labels is not None else 0),
    }
    row_h = {r: th + under[r] * LINE_H + PAD for r in rows}
    cols = min(num, MAX_COLUMNS)
    blocks = math.ceil(num / MAX_COLUMNS)
    block_h = HEADER_H + sum(row_h.values())
    width = LABEL_W + cols * (tw + PAD) + PAD
    height = blocks * (block_h + PAD) + PAD
    layout = GridLayout(width, height, (tw, th), most_leaked=most)
    names = row_names or {
        "truth": ("client's images", "(ground truth)"),
        "recon": ("reconstructed", "by the attack"),
    }
    for b in range(blocks):
        top = PAD + b * (block_h + PAD)
        y = top + HEADER_H
        for r in rows:
            layout.texts.append((PAD, y + th // 2 - LINE_H, names[r][0], TEXT_COLOUR))
            layout.texts.append((PAD, y + th // 2, names[r][1], MUTED_COLOUR))
            y += row_h[r]
        for c in range(min(MAX_COLUMNS, num - b * MAX_COLUMNS)):
            i = b * MAX_COLUMNS + c
            x = LABEL_W + c * (tw + PAD)
            leaked = has_truth and i == most
            head = (column_heads[i] if column_heads else f"image {i}") + (" - most leaked" if leaked else "")
            layout.texts.append((x, top + 3, head, LEAK_COLOUR if leaked else TEXT_COLOUR))
            y = top + HEADER_H
            for r in rows:
                j = perm[i] if (r == "recon" and has_truth) else i
                layout.tiles.append((x, y, r, j))
                ty = y + th + 2
                if r == "truth" and true_labels is not None:
                    layout.texts.append((x, ty, f"label {true_labels[i]}", MUTED_COLOUR))
                if r == "recon":
                    if metrics is not None:
                        p = None if psnr is None else psnr[i]
                        s = None if ssim is None else ssim[i]
                        colour = LEAK_COLOUR if leaked else TEXT_COLOUR
                        layout.texts.append((x, ty, f"PSNR {fmt_num(p, 1, ' dB')}", colour))
                        layout.texts.append((x, ty + LINE_H, f"SSIM {fmt_num(s, 3)}", colour))
                        ty += 2 * LINE_H
                    if recon_labels is not None:
                        layout.texts.append((x, ty, f"label {recon_labels[j]}", MUTED_COLOUR))
                y += row_h[r]
            if leaked:
                layout.frames.append((x - 3, top + HEADER_H - 3, x + tw + 2, y - PAD + 2))
    return layout


def _tile(img: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
    return pil.resize(size, Image.Resampling.NEAREST)


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_grid_png(
    recon: torch.Tensor,
    truth: torch.Tensor | None = None,
    metrics: dict[str, Any] | None = None,
    *,
    recon_labels: Sequence[int] | None = None,
    true_labels: Sequence[int] | None = None,
    row_names: dict[str, tuple[str, str]] | None = None,
    column_heads: Sequence[str] | None = None,
) -> bytes:
    """The client's images above their matched reconstructions (metrics["permutation"][i] is the
    reconstruction matched to truth image i), each reconstruction with its PSNR and SSIM, the
    most leaked image framed; without ground truth, the reconstructions alone (titles: grid_layout)."""
    n, _, h, w = recon.shape
    has_truth = truth is not None
    layout = grid_layout(
        len(truth) if truth is not None else n,
        (h, w),
        has_truth=has_truth,
        metrics=metrics if has_truth else None,
        recon_labels=recon_labels,
        true_labels=true_labels if has_truth else None,
        row_names=row_names,
        column_heads=column_heads,
    )
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in layout.frames:
        draw.rectangle((x0, y0, x1, y1), outline=LEAK_COLOUR, width=3)
    for x, y, row, j in layout.tiles:
        src = truth if row == "truth" and truth is not None else recon
        canvas.paste(_tile(src[j], layout.tile), (x, y))
    font = _font()
    for x, y, text, colour in layout.texts:
        draw.text((x, y), text, fill=colour, font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the loss curve
# --------------------------------------------------------------------------------------------


def render_loss_png(history: Sequence[float], size: tuple[int, int] = (560, 220)) -> bytes | None:
    """The attack's objective per iteration (log scale when it spans a decade), with its best so far."""
    values = [v for v in history if math.isfinite(v)]
    if len(values) < 2:
        return None
    log = min(values) > 0 and max(values) / min(values) > 10
    ys = [math.log10(v) for v in values] if log else list(values)
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1
    w, h = size
    left, right, top, bottom = 64, 12, 12, 30
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.rectangle((left, top, w - right, h - bottom), outline=(160, 160, 160))

    def point(i: int, y: float) -> tuple[float, float]:
        px = left + (w - left - right) * i / (len(ys) - 1)
        return px, top + (h - top - bottom) * (hi - y) / (hi - lo)

    draw.line([point(i, y) for i, y in enumerate(ys)], fill=(120, 150, 210), width=1)
    best, running = [], math.inf
    for y in ys:
        running = min(running, y)
        best.append(running)
    draw.line([point(i, y) for i, y in enumerate(best)], fill=(20, 60, 160), width=2)
    label = (lambda y: f"{10**y:.3g}") if log else (lambda y: f"{y:.3g}")
    draw.text((4, top - 2), label(hi), fill=TEXT_COLOUR, font=font)
    draw.text((4, h - bottom - 12), label(lo), fill=TEXT_COLOUR, font=font)
    draw.text((left, h - bottom + 4), "0", fill=TEXT_COLOUR, font=font)
    end = f"{len(ys)} iterations"
    draw.text((w - right - draw.textlength(end, font=font), h - bottom + 4), end, fill=TEXT_COLOUR, font=font)
    scale = "log scale" if log else "linear scale"
    draw.text((left + 8, h - 14), f"attack loss ({scale}); dark: best so far", fill=MUTED_COLOUR, font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the HTML report
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return html.escape(", ".join(str(x) for x in v))
    return html.escape(str(v))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _kv_table(rows: Sequence[tuple[str, Any]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _metrics_section(metrics: dict[str, Any] | None, unavailable: str | None) -> str:
    if metrics is None:
        return f"<h2>Leakage</h2><p>No reconstruction metric was computed: {_fmt(unavailable)}.</p>"
    mean, worst = metrics.get("mean", {}), metrics.get("worst_case", {})
    rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(mean.get(name))}</td><td>{_fmt(worst.get(name))}</td></tr>"
        for name in ("psnr", "ssim", "lpips", "mse")
    )
    table = (
        "<table><tr><th>metric</th><th>mean over images</th>"
        f"<th>worst case (the most leaking value over images)</th></tr>{rows}</table>"
    )
    acc = metrics.get("label_accuracy")
    labels = (
        "<p>Labels were not scored: the ground truth has no labels.</p>"
        if acc is None
        else _kv_table(
            [
                ("label accuracy, as a multiset (which labels, in any order)", acc["multiset"]),
                ("label accuracy, per image (after matching)", acc["positional"]),
            ]
        )
    )
    notes = "".join(
        f"<p class=note>{html.escape(k.removesuffix('_unavailable').upper())} unavailable: {_fmt(v)}</p>"
        for k, v in metrics.items()
        if k.endswith("_unavailable") and v
    )
    return f"<h2>Leakage</h2>{table}{labels}{notes}"


def _per_image_table(
    metrics: dict[str, Any] | None, recon_labels: Sequence[int], true_labels: Sequence[int] | None
) -> str:
    if metrics is None:
        return ""
    per = metrics.get("per_image", {})
    perm = metrics.get("permutation", [])
    most = metrics.get("worst_case", {}).get("image")
    names = [m for m in ("psnr", "ssim", "lpips", "mse") if per.get(m) is not None]
    head = "<tr><th>image</th><th>reconstruction</th><th>label (true / recovered)</th>"
    head += "".join(f"<th>{m}</th>" for m in names) + "</tr>"
    body = ""
    for i in range(metrics.get("num_images", len(perm))):
        j = perm[i] if i < len(perm) else i
        true = "?" if true_labels is None else true_labels[i]
        got = recon_labels[j] if j < len(recon_labels) else "?"
        mark = ' class="leak"' if i == most else ""
        name = f"{i} (most leaked)" if i == most else str(i)
        body += f"<tr{mark}><td>{name}</td><td>{j}</td><td>{_fmt(true)} / {_fmt(got)}</td>"
        body += "".join(f"<td>{_fmt(per[m][i])}</td>" for m in names) + "</tr>"
    return f"<h3>Per image</h3><table>{head}{body}</table>"


def _attack_section(spec: JobSpec, manifest: dict[str, Any], loss_png: bytes | None) -> str:
    a = manifest["attack"]
    level = Knowledge(spec.knowledge)
    conv = a.get("convergence") or {}
    basis = html.escape(str(conv.get("basis", "")))
    if conv.get("converged") is False:
        judged = (
            f"<p class=warn>The attack had not converged: it ran {conv['iterations']} iterations, "
            f"fewer than the {conv['needed_iterations']} it needs ({basis}). A larger budget may leak "
            "more; a low score here is weak evidence of safety.</p>"
        )
    elif conv.get("converged"):
        judged = f"<p>Enough iterations to converge: {conv['iterations']} ({basis}).</p>"
    else:
        judged = f"<p>Convergence not judged: {basis}.</p>"
    for limit in a.get("limits") or []:
        judged += f"<p class=warn>Caution: {html.escape(limit['message'])}.</p>"
    params = spec.attack.model_dump(exclude={"name"})
    facts = [
        ("attack", f"{spec.attack.name}: {ATTACKS.get(spec.attack.name).description}"),
        ("knowledge level", f"{int(level)}: {level.describe}"),
        ("iterations", f"{a['iterations']} of {spec.budget.iterations} (stopped by: {a['stop_reason']})"),
        ("restarts", spec.budget.restarts),
        ("time limit (s)", spec.budget.time_limit_s),
        ("best attack loss", a.get("best_loss")),
        ("matching cost", a.get("matching_cost")),
        ("target", a.get("target_kind")),
        ("images", f"{a['num_images']} ({a['num_images_source']})"),
        ("labels", f"{_fmt(a['labels'])} ({a['label_source']})"),
    ]
    curve = (
        f'<figure><img alt="attack loss per iteration" src="{_data_uri(loss_png)}"></figure>'
        if loss_png is not None
        else ""
    )
    return (
        f"<h2>Attack</h2>{_kv_table(facts)}<h3>Parameters</h3>{_kv_table(sorted(params.items()))}"
        f"<h3>Loss curve</h3>{curve}{judged}"
    )


_CLIENT_FIELDS = (
    ("protocol", "protocol"),
    ("lr", "learning rate"),
    ("local_epochs", "local epochs"),
    ("batch_size", "batch size"),
    ("num_samples", "samples"),
    ("optimizer", "optimizer"),
    ("momentum", "momentum"),
    ("bn_mode", "batch-norm mode"),
    ("shuffle_seed", "shuffle seed"),
)


def _client_section(spec: JobSpec, manifest: dict[str, Any]) -> str:
    told = spec.update.client
    sim = spec.update.simulate
    did = sim.training if sim is not None else None
    head = "<tr><th>fact</th>" + ("<th>what the client did (simulated)</th>" if did else "")
    head += "<th>what the attacker was told</th></tr>"
    body = ""
    for key, name in _CLIENT_FIELDS:
        done = None if did is None else getattr(did, key)
        cells = "" if did is None else f"<td>{'not set' if done is None else _fmt(done)}</td>"
        value = getattr(told, key)
        rough = getattr(told.candidates, key, None) if told.candidates is not None else None
        if value is not None:
            shown = _fmt(value)
        elif rough is not None:
            shown = "candidates: " + _fmt(rough.model_dump() if hasattr(rough, "model_dump") else rough)
        else:
            shown = "unknown"
        body += f"<tr><th>{name}</th>{cells}<td>{shown}</td></tr>"
    a = manifest["attack"]
    case = (a.get("details") or {}).get("fedavg_case")
    extra = [
        ("update kind", spec.update.kind),
        ("update source", f"simulated client ({sim.source}): {', '.join(sim.images)}" if sim else "uploaded"),
        ("batch-norm mode used by the attack", a.get("bn_mode")),
    ]
    if case is not None:
        readable = {
            "case1_unrolled": "Case 1: lr, epochs and batch size known, the local training unrolled",
            "case1_searched": "Case 1 with facts searched: every hypothesis screened, the best by the "
            "attack's own loss unrolled",
            "case2_single_step": "Case 2: batch size unknown, one step on the whole batch approximates "
            "the local training",
        }
        extra.append(("FedAvg case", readable.get(str(case), str(case))))
        search = (a.get("details") or {}).get("search")
        if isinstance(search, dict):
            chosen = ", ".join(
                f"{k} {'none' if v is None else f'{v:.4g}' if isinstance(v, float) else v}"
                for k, v in search.get("chosen", {}).items()
            )
            extra.append(("hypotheses searched", str(len(search.get("candidates", [])))))
            extra.append(("hypothesis chosen", chosen))
    note = (
        "<p class=note>The attacker sees these facts only at knowledge level 3 or above (the batch-norm "
        "mode at every level).</p>"
    )
    return f"<h2>Client</h2><table>{head}{body}</table>{_kv_table(extra)}{note}"


def _defenses_section(spec: JobSpec) -> str:
    if not spec.defenses:
        return "<h2>Defenses</h2><p>None: the update was attacked as shared.</p>"
    items = "".join(
        "<li><b>{}</b> {}</li>".format(
            html.escape(d.name),
            ", ".join(f"{k}={_fmt(v)}" for k, v in d.model_dump(exclude={"name"}).items()),
        )
        for d in spec.defenses
    )
    return f"<h2>Defenses</h2><p>Applied, in this order, to the update before the attack:</p><ol>{items}</ol>"


def _run_section(spec: JobSpec, manifest: dict[str, Any]) -> str:
    versions = manifest.get("versions", {})
    device = manifest.get("device", {})
    timings = manifest.get("timings", {})
    facts = [
        ("job", manifest.get("job_id")),
        ("date", manifest.get("date")),
        ("seed", spec.seed),
        ("model", f"{spec.model.arch} {_fmt(spec.model.knobs or '')}".strip()),
        ("weights", spec.model.weights or f"fresh initialisation, seed {spec.model.init_seed}"),
        ("data", f"{'x'.join(map(str, spec.data.shape))}, {spec.data.num_classes} classes"),
        ("gradleak version", versions.get("gradleak")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "gradleak")),
        ("machine", ", ".join(f"{k} {v}" for k, v in device.items())),
        ("attack time (s)", timings.get("attack_s")),
        ("iterations per second", timings.get("iterations_per_s")),
    ]
    return f"<h2>Run</h2>{_kv_table(facts)}"


def estimate_section(estimate: dict[str, Any] | None, shadows_png: bytes | None = None) -> str:
    """The verdict and the no-leak floor (an estimate made without the ground truth), shown when a
    job has one; an empty string otherwise."""
    if not estimate:
        return ""
    from service.verdict.render import render_estimate_html

    return render_estimate_html(estimate, shadows_png)


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:62rem;padding:0 1rem;
color:#222;line-height:1.35}h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;margin-top:1.6rem}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #ccc;padding:.25rem .55rem;
text-align:left;vertical-align:top}table.kv th{background:#f6f6f6;font-weight:600;width:16rem}
tr.leak td{background:#fde8e8}.note{color:#555;font-size:.9rem}.warn{background:#fff4d6;
border-left:4px solid #e0a800;padding:.4rem .7rem}figure{margin:.6rem 0}img{max-width:100%}
.lead{font-size:1.1rem}"""


def render_report_html(
    spec: JobSpec,
    result: AttackResult,
    manifest: dict[str, Any],
    grid_png: bytes,
    *,
    true_labels: Sequence[int] | None = None,
    estimate: dict[str, Any] | None = None,
    shadows_png: bytes | None = None,
) -> str:
    """The whole job on one page: what leaked (grid, metrics, per image), how the attack ran, what
    the client did and was said to have done, the defenses, and where and when it ran."""
    metrics = manifest.get("metrics")
    worst = (metrics or {}).get("worst_case", {})
    if metrics is not None:
        i, per = worst.get("image"), metrics.get("per_image", {})
        ssim = per.get("ssim")
        lead = (
            f"The most leaked image (image {i}) was reconstructed at PSNR {_fmt(per['psnr'][i])} dB"
            + ("" if ssim is None else f", SSIM {_fmt(ssim[i])}")
            + f"; the mean over {metrics['num_images']} image(s) is {_fmt(metrics['mean'].get('psnr'))} dB."
        )
    else:
        lead = "The attack's reconstructions are shown below; no ground truth was given to score them."
    caption = (
        "Top row: the client's images; below: the reconstruction matched to each, with its PSNR and "
        "SSIM. The most leaked image is framed in red."
        if metrics is not None
        else "The reconstructions."
    )
    loss_png = render_loss_png(result.loss_history)
    date = manifest.get("date") or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = manifest.get("versions", {}).get("gradleak")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{REPORT_POLICY}">
<title>gradleak report {_fmt(manifest.get("job_id"))}</title>
<style>{_STYLE}</style></head><body>
<h1>gradleak leakage report</h1>
<p class=note>Job {_fmt(manifest.get("job_id"))}, {_fmt(date)}, gradleak {_fmt(version)}</p>
<p class=lead>{lead}</p>
{estimate_section(estimate, shadows_png)}
<figure><img alt="the client's images and their reconstructions" src="{_data_uri(grid_png)}">
<figcaption class=note>{caption}</figcaption></figure>
{_metrics_section(metrics, manifest.get("metrics_unavailable"))}
{_per_image_table(metrics, result.labels.tolist(), true_labels)}
{_attack_section(spec, manifest, loss_png)}
{_client_section(spec, manifest)}
{_defenses_section(spec)}
{_run_section(spec, manifest)}
</body></html>
"""
