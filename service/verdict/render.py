"""The estimate as an HTML section of report.html (self-contained; every value escaped)."""

from __future__ import annotations

import html
from typing import Any

from service.verdict.estimate import EXACT_DB, METRICS, SCOPES


def _num(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.3g}{unit}" if isinstance(v, float) else html.escape(str(v))


def render_estimate_html(estimate: dict[str, Any] | None) -> str:
    """A <section> with the estimate, its intervals, the gain over the no-leak floor and the label
    histogram; empty when there is no estimate."""
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
            rows += (
                f"<tr><td>{metric}</td><td>{scope.replace('_', ' ')}</td><td>{value}</td>"
                f"<td>[{_num(lo)}, {_num(hi)}]</td><td>{_num(e.get('gain_over_floor'), unit)}</td>"
                f"<td>{_num(estimate['floor'][metric][scope], unit)}</td></tr>"
            )
    labels = estimate["labels"]
    counts = ", ".join(f"class {html.escape(k)}: {v}" for k, v in labels["counts"].items())
    unavailable = "".join(
        f"<p>{html.escape(m)} unavailable: {html.escape(why)}</p>"
        for m, why in estimate.get("unavailable", {}).items()
    )
    return f"""<section id="estimate"><h2>Leakage estimate (without the client's images)</h2>
<p>{html.escape(estimate.get("summary", ""))}. {estimate["shadows_run"]} shadow audits on
{html.escape(estimate["proxy_data"])}; method: {html.escape(estimate["method"])}.</p>
<table><tr><th>metric</th><th>over</th><th>estimate</th><th>interval</th><th>gain over floor</th>
<th>no-leak floor</th></tr>{rows}</table>{unavailable}
<p>Labels the update reveals ({html.escape(labels["certainty"])}): {counts}. {html.escape(labels["why"])}.</p>
</section>"""
