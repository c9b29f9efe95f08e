"""What a federation writes: the per-round table (rounds.json, rounds.csv), a plot of accuracy,
IGSA and attack quality against the round (rounds.png), and a self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Callable
from typing import Any

from service.federations.spec import FederationSpec
from service.jobs.types import REPORT_POLICY

ROUNDS_JSON, ROUNDS_CSV, ROUNDS_PNG, REPORT_HTML = "rounds.json", "rounds.csv", "rounds.png", "report.html"
CONTENT_TYPES = {
    ROUNDS_JSON: "application/json",
    ROUNDS_CSV: "text/csv; charset=utf-8",
    ROUNDS_PNG: "image/png",
    REPORT_HTML: "text/html; charset=utf-8",
}
COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "update_norm",
    "igsa",
    "igsa_sensitivity",
    "audited_client",
    "audit_images",
    "igsa_client",
    "psnr_mean",
    "psnr_worst",
    "ssim_mean",
    "ssim_worst",
    "lpips_mean",
    "label_accuracy",
    "estimate_psnr_mean",  # audit.verdict.when: always (the estimate without the shard, beside the truth)
    "estimate_psnr_worst",
    "attack_iterations",
    "attack_s_per_iteration",
    "igsa_s",
    "igsa_client_s",
    "train_s",
    "audit_s",
    "round_s",
    "clients",
)

Save = Callable[[str, bytes, str], None]
GridFor = Callable[[int], bytes | None]


def rounds_csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "clients": " ".join(map(str, row.get("clients", [])))})
    return buf.getvalue().encode()


def write_outputs(
    spec: FederationSpec,
    rows: list[dict[str, Any]],
    initial: tuple[float, float],
    save: Save,
    *,
    final: bool,
    grid_for: GridFor,
    chance: float,
) -> None:
    """The tables after every round (so a crash keeps what was done); plot and report at the end."""
    save(ROUNDS_JSON, json.dumps(rows, indent=2).encode(), CONTENT_TYPES[ROUNDS_JSON])
    save(ROUNDS_CSV, rounds_csv(rows), CONTENT_TYPES[ROUNDS_CSV])
    if not final or not rows:
        return
    plot = render_rounds_png(rows, initial[0], chance)
    save(ROUNDS_PNG, plot, CONTENT_TYPES[ROUNDS_PNG])
    save(
        REPORT_HTML,
        render_report_html(spec, rows, initial, plot, grid_for).encode(),
        CONTENT_TYPES[REPORT_HTML],
    )


def render_rounds_png(rows: list[dict[str, Any]], initial_accuracy: float, chance: float) -> bytes:
    """Three panels over the round: test accuracy (and chance); IGSA (probe batch, audited
    client); attack PSNR (mean, worst case) with SSIM on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [row["round"] for row in rows]
    audited = [row for row in rows if row.get("psnr_mean") is not None]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True, constrained_layout=True)
    acc, smooth, leak = axes
    acc.plot([0, *rounds], [initial_accuracy, *(row["test_accuracy"] for row in rows)], marker="o", ms=3)
    acc.axhline(chance, color="grey", linestyle=":", label="chance")
    acc.legend(fontsize=8)
    acc.set_ylabel("test accuracy")
    acc.set_ylim(0, 1)
    acc.grid(alpha=0.3)
    smooth.plot(rounds, [row["igsa"] for row in rows], marker="o", ms=3, label="probe batch (test images)")
    with_client = [row for row in rows if row.get("igsa_client") is not None]
    if with_client:
        smooth.plot([row["round"] for row in with_client], [row["igsa_client"] for row in with_client],
                    "s", label="audited client's data")  # fmt: skip
    smooth.set_ylabel("IGSA (higher = smoother)")
    smooth.legend(fontsize=8)
    smooth.grid(alpha=0.3)
    if audited:
        x = [row["round"] for row in audited]
        leak.plot(x, [row["psnr_mean"] for row in audited], "o-", label="PSNR mean")
        leak.plot(x, [row["psnr_worst"] for row in audited], "^--", label="PSNR worst case")
        leak.set_ylabel("attack PSNR (dB)")
        twin = leak.twinx()
        twin.plot(x, [row["ssim_mean"] for row in audited], "s:", color="tab:green", label="SSIM mean")
        twin.set_ylabel("SSIM")
        twin.set_ylim(0, 1)
        lines = leak.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        leak.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    else:
        leak.text(0.5, 0.5, "no audited round", ha="center", va="center", transform=leak.transAxes)
    leak.set_xlabel("round")
    leak.xaxis.set_major_locator(MaxNLocator(integer=True))
    leak.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def render_report_html(
    spec: FederationSpec,
    rows: list[dict[str, Any]],
    initial: tuple[float, float],
    plot: bytes,
    grid_for: GridFor,
) -> str:
    local, last = spec.client, rows[-1]
    facts = [
        ("model", f"{spec.model.arch} {json.dumps(spec.model.knobs) if spec.model.knobs else ''}"),
        ("data", f"{spec.data.source}, {spec.data.size}px, test fraction {spec.data.test_fraction}"),
        (
            "clients",
            f"{spec.num_clients} ({spec.per_round} per round), {spec.partition.kind} partition"
            + (f" (alpha {spec.partition.alpha})" if spec.partition.kind == "dirichlet" else ""),
        ),
        (
            "local training",
            f"{local.protocol}, lr {local.lr}, {local.local_epochs} epoch(s), batch "
            f"{local.batch_size}, momentum {local.momentum}, BN {local.bn_mode}",
        ),
        (
            "defenses",
            ", ".join(f"{d.name} {d.model_dump(exclude={'name'})}" for d in spec.defenses) or "none",
        ),
        ("rounds", f"{len(rows)} of {spec.rounds}; server lr {spec.server_lr}; seed {spec.seed}"),
        (
            "audit",
            f"{spec.audit.attack.name} at knowledge level {int(spec.audit.knowledge)}, "
            f"{spec.audit.budget.iterations} iterations, rounds {spec.audit.rounds or 'none'}",
        ),
        ("accuracy", f"{initial[0]:.3f} at first, {last['test_accuracy']:.3f} after round {last['round']}"),
    ]
    shown = [c for c in COLUMNS if c not in ("clients",) and any(row.get(c) is not None for row in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in shown) + "</tr>" for row in rows)
    grids = []
    for row in rows:
        grid = grid_for(row["round"]) if row.get("audited_client") is not None else None
        if grid is not None:
            grids.append(
                f"<h3>Round {row['round']}: client {row['audited_client']} (PSNR mean "
                f"{_fmt(row.get('psnr_mean'))} dB, worst case {_fmt(row.get('psnr_worst'))} dB)</h3>"
                "<p>top: the client's images; bottom: what the attack rebuilt from its update</p>"
                + _img(grid, f"round {row['round']} reconstruction")
            )
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{REPORT_POLICY}"><title>gradleak federation report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%;text-align:right}}th{{background:#f3f3f3}}
img{{max-width:100%}}.l{{text-align:left}}</style></head><body>
<h1>Federation report</h1>
<table>{"".join(f"<tr><th>{k}</th><td class='l'>{html.escape(v)}</td></tr>" for k, v in facts)}</table>
<h2>Accuracy, IGSA and leakage per round</h2>
<p>IGSA: input-gradient smoothness, higher means smoother and, by the SoK's finding, easier to invert.
PSNR/SSIM: what a curious server rebuilt from the audited client's update of that round.</p>
{_img(plot, "accuracy, IGSA and attack PSNR per round")}
<h2>Rounds</h2><table><tr>{head}</tr>{body}</table>
<h2>Reconstructions</h2>{"".join(grids) or "<p>no audited round</p>"}
</body></html>"""
