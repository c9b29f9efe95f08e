"""A study's outputs: the tidy table (one row per point), plots over each axis, an HTML report.

Rows come from the points' stored manifests. Numeric axes get a line of the study's metric (mean
over seeds, with the spread over seeds as a band); categorical axes get grouped bars (one group
per value, one bar per value of the other axes, the seeds' spread as error bars). A federation
study also plots each point's final accuracy against its audit's leakage (privacy and utility).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import statistics
import textwrap
from collections import defaultdict
from typing import Any

from service.jobs.records import JobRecord
from service.jobs.types import JobContext
from service.studies.spec import StudyPlan

TABLE_CSV = "table.csv"
TABLE_JSON = "table.json"
REPORT_HTML = "report.html"
METRICS_JSON = "metrics.json"
CONTENT_TYPES = {
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
METRICS = ("psnr", "ssim", "lpips")  # the metrics every row carries (mean and worst case)
JOB_COLUMNS = (
    *(f"{m}_{k}" for m in METRICS for k in ("mean", "worst")),
    "label_accuracy",
    "attack_iterations",
    "setup_s",
    "attack_s",
    "scoring_s",
    "total_s",
)
FEDERATION_COLUMNS = (
    "final_accuracy",
    "initial_accuracy",
    "final_igsa",
    "audited_rounds",
    *(f"{m}_{k}" for m in METRICS for k in ("mean", "worst")),
    "label_accuracy",
    "igsa_client",
    "mean_round_s",
    "total_s",
)


def columns(plan: StudyPlan) -> list[str]:
    axes = [a.column for a in plan.study.axes]
    kind = JOB_COLUMNS if plan.study.kind == "job" else FEDERATION_COLUMNS
    return ["point", *axes, "seed", "status", "id", *kind, "error"]


def rows_of(plan: StudyPlan, records: list[JobRecord]) -> list[dict[str, Any]]:
    cols = columns(plan)
    rows = []
    for point, record in zip(plan.points, records, strict=True):
        row: dict[str, Any] = dict.fromkeys(cols)
        row.update(point.values)
        row.update(point=point.index, seed=point.seed, status=record.status.value, id=record.id)
        row["error"] = None if record.error is None else record.error.message
        manifest = record.manifest or {}
        row.update(_job_row(manifest) if plan.study.kind == "job" else _federation_row(manifest))
        rows.append(row)
    return rows


def _job_row(manifest: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    metrics = manifest.get("metrics") or {}
    mean, worst = metrics.get("mean") or {}, metrics.get("worst_case") or {}
    for m in METRICS:
        out[f"{m}_mean"], out[f"{m}_worst"] = mean.get(m), worst.get(m)
    out["label_accuracy"] = (metrics.get("label_accuracy") or {}).get("multiset")
    out["attack_iterations"] = (manifest.get("attack") or {}).get("iterations")
    timings = manifest.get("timings") or {}
    for k in ("setup_s", "attack_s", "scoring_s", "total_s"):
        out[k] = timings.get(k)
    return out


def _federation_row(manifest: dict[str, Any]) -> dict[str, Any]:
    rounds = manifest.get("rounds") or []
    audited = [r for r in rounds if r.get("psnr_mean") is not None]

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in audited if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    def worst_of(key: str, higher: bool) -> float | None:
        values = [r[key] for r in audited if r.get(key) is not None]
        return (max if higher else min)(values) if values else None

    out: dict[str, Any] = {
        "final_accuracy": (manifest.get("final") or {}).get("test_accuracy"),
        "initial_accuracy": (manifest.get("initial") or {}).get("test_accuracy"),
        "final_igsa": rounds[-1].get("igsa") if rounds else None,
        "audited_rounds": len(audited),
        "label_accuracy": mean_of("label_accuracy"),
        "igsa_client": mean_of("igsa_client"),
        "mean_round_s": (manifest.get("timings") or {}).get("mean_round_s"),
        "total_s": (manifest.get("timings") or {}).get("total_s"),
    }
    for m, higher in (("psnr", True), ("ssim", True), ("lpips", False)):
        out[f"{m}_mean"] = mean_of(f"{m}_mean")
        out[f"{m}_worst"] = worst_of(f"{m}_worst", higher) if audited and f"{m}_worst" in audited[0] else None
    return out


def table_csv(rows: list[dict[str, Any]], cols: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue().encode()


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-") or "axis"


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.fmean(values), min(values), max(values)


def plot_axes(plan: StudyPlan, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG and SVG per axis (and the privacy-utility plot of a federation study): name -> bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"{plan.study.metric}_mean"
    done = [r for r in rows if isinstance(r.get(metric), int | float)]
    figures: dict[str, Any] = {}
    for axis in plan.study.axes:
        others = [a.column for a in plan.study.axes if a is not axis]
        groups: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in done:
            label = ", ".join(f"{o}={r[o]}" for o in others) or plan.study.metric
            groups[label][r[axis.column]].append(float(r[metric]))
        if len(groups) > 6:  # too many lines to read: pool the other axes
            pooled: dict[Any, list[float]] = defaultdict(list)
            for series in groups.values():
                for x, ys in series.items():
                    pooled[x].extend(ys)
            groups = {f"all {', '.join(others)}": pooled}  # type: ignore[assignment]
        fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
        # a label shared by several values (zipped axes: "intact" for each architecture) is one group
        order = list(dict.fromkeys(axis.label(i) for i in range(len(axis.values))))
        if axis.numeric and axis.labels is None:
            for label, series in groups.items():
                xs = sorted(series)
                stats = [_spread(series[x]) for x in xs]
                ax.plot(xs, [s[0] for s in stats], "o-", label=label)
                ax.fill_between(xs, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
        else:
            width = 0.8 / max(1, len(groups))
            for j, (label, series) in enumerate(groups.items()):
                stats = [_spread(series[x]) if series.get(x) else (float("nan"),) * 3 for x in order]
                xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(order))]
                means = [s[0] for s in stats]
                err = [[m - s[1] for m, s in zip(means, stats, strict=True)],
                       [s[2] - m for m, s in zip(means, stats, strict=True)]]  # fmt: skip
                ax.bar(xs, means, width=width, yerr=err, capsize=3, label=label)
            turn = len(order) > 4  # turned labels end under their bars
            ax.set_xticks(
                range(len(order)),
                [str(o) for o in order],
                rotation=30 if turn else 0,
                ha="right" if turn else "center",
            )
        ax.set_xlabel(axis.column)
        ax.set_ylabel(f"{plan.study.metric} (mean over images; band/bars: spread over seeds)")
        title = f"{plan.study.title}: {plan.study.metric} against {axis.column}"
        ax.set_title(textwrap.fill(title, 90), fontsize=9 if len(title) > 70 else None)
        ax.grid(alpha=0.3)
        if groups:
            ax.legend(fontsize=7)
        figures[f"plots/{_slug(axis.column)}"] = fig
    if plan.study.kind == "federation":
        fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        for r in done:
            if r.get("final_accuracy") is not None:
                name = ", ".join(str(r[a.column]) for a in plan.study.axes) or "base"
                ax.scatter(r["final_accuracy"], r[metric])
                ax.annotate(name, (r["final_accuracy"], r[metric]), fontsize=7)
        ax.set_xlabel("final test accuracy (utility)")
        ax.set_ylabel(f"audit {plan.study.metric} (leakage)")
        ax.set_title(f"{plan.study.title}: privacy and utility")
        ax.grid(alpha=0.3)
        figures["plots/privacy-utility"] = fig
    out: dict[str, bytes] = {}
    for name, fig in figures.items():
        for ext in ("png", "svg"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=110)
            out[f"{name}.{ext}"] = buf.getvalue()
        plt.close(fig)
    return out


MAX_GRIDS = 48  # reconstructions shown in the report: the first seed's points, up to this many


def reconstruction_grids(plan: StudyPlan, records: list[JobRecord], store: Any) -> list[tuple[str, bytes]]:
    """(caption, PNG) of each point's truth-over-reconstruction grid, first seed only; a federation
    point shows its last audited round."""
    first_seed = plan.study.seeds[0]
    grids: list[tuple[str, bytes]] = []
    for point, record in zip(plan.points, records, strict=True):
        if point.seed != first_seed or len(grids) >= MAX_GRIDS:
            continue
        names = sorted(n for n in record.artifacts if n == "grid.png" or n.endswith("/grid.png"))
        if not names:
            continue
        try:
            data = store.get_bytes(record.artifacts[names[-1]])
        except Exception:  # a point's outputs may be gone (retention); the report goes on without
            continue
        caption = ", ".join(f"{k}={v}" for k, v in point.values.items()) or "base"
        grids.append((caption, data))
    return grids


def render_report_html(
    plan: StudyPlan,
    rows: list[dict[str, Any]],
    cols: list[str],
    plots: dict[str, bytes],
    grids: list[tuple[str, bytes]] | None = None,
) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, data in plots.items()
        if name.endswith(".png")
    )
    recon = "".join(
        f'<figure><img alt="reconstruction" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, data in grids or []
    )
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(plan.study.title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:720px}pre{background:#f6f6f6;padding:1em}"
        f"</style></head><body><h1>{html.escape(plan.study.title)}</h1>"
        f"<p>{len(rows)} points ({html.escape(summary)}); {html.escape(plan.study.describe_count())}.</p>"
        f"<h2>Plots</h2>{images or '<p>no finished point to plot</p>'}"
        f"<h2>Table</h2><table><tr>{head}</tr>{body}</table>"
        + (
            f"<h2>Reconstructions (truth over reconstruction, seed {plan.study.seeds[0]})</h2>{recon}"
            if recon
            else ""
        )
        + f"<h2>Spec</h2><pre>{html.escape(plan.study.to_yaml())}</pre></body></html>"
    )


def write_outputs(
    plan: StudyPlan, records: list[JobRecord], ctx: JobContext, *, elapsed_s: float
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write the table, plots and report under the study's prefix: (manifest, artifacts)."""
    cols = columns(plan)
    rows = rows_of(plan, records)
    plots = plot_axes(plan, rows)
    files: dict[str, bytes] = {
        TABLE_CSV: table_csv(rows, cols),
        TABLE_JSON: json.dumps({"columns": cols, "rows": rows}, indent=1).encode(),
        **plots,
        REPORT_HTML: render_report_html(
            plan, rows, cols, plots, reconstruction_grids(plan, records, ctx.store)
        ).encode(),
    }
    artifacts: dict[str, str] = {}
    for name, data in files.items():
        key = f"{ctx.prefix}/{name}"
        ctx.store.put_bytes(key, data, CONTENT_TYPES[name[name.rindex(".") :]])
        artifacts[name] = key
    statuses: dict[str, int] = defaultdict(int)
    for r in rows:
        statuses[r["status"]] += 1
    manifest = {
        "job_id": ctx.job_id,
        "kind": "study",
        "title": plan.study.title,
        "points": len(rows),
        "statuses": dict(statuses),
        "elapsed_s": elapsed_s,
        "columns": cols,
        "artifacts": dict(artifacts),
    }
    key = f"{ctx.prefix}/{METRICS_JSON}"
    ctx.store.put_bytes(key, json.dumps(manifest, indent=2).encode(), CONTENT_TYPES[".json"])
    artifacts[METRICS_JSON] = key
    return manifest, artifacts
