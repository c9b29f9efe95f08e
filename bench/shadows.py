"""The verdict's shadow audits batched (one vectorised computation) against one after another.

Each case is one of bench.verdict's held-out cases (its model, update and spec), audited through
the runner with `verdict.when: always`; the verdict's own time (`estimate.elapsed_s`: making the
shadows, attacking them, scoring, the floor) is measured with the shadows batched and, in the same
process, with them run one after another (service.verdict.attack_shadows with batch=False), the two
alternating over repeats. Reported per case and K: the median seconds of each, their ratio, how the
shadows ran, and how far the two PSNR estimates lie apart (float rounding in a batched computation
can move an attack's path).

    python -m bench.shadows [--cases 6] [--shadows 3,5] [--repeats 3] [--iterations 200]

Results: bench/results/verdict-shadows-cpu.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import service.verdict
from bench.attacks import machine
from bench.verdict import _what, all_cases, case_spec
from service.jobs.runner import run_job
from service.jobs.types import JobContext
from service.storage import LocalStore
from service.verdict.shadows import attack_shadows

RESULTS = Path(__file__).parent / "results"


def audit(case: dict[str, Any], size: int, iterations: int, shadows: int, batch: bool) -> dict[str, Any]:
    """One audit of the case; the verdict's seconds, how its shadows ran, its PSNR estimates."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec, _ = case_spec(case, size, iterations, shadows, work)
        ctx = JobContext(f"case{case['id']}", LocalStore(work / "store"), "j", lambda r: Path(r).read_bytes())
        run = functools.partial(attack_shadows, batch=batch)
        with mock.patch.object(service.verdict, "attack_shadows", run):
            out = run_job(spec, ctx)
    e = out.manifest["estimate"]
    return {
        "seconds": e["elapsed_s"],
        "execution": e["execution"],
        "psnr": {s: e["psnr"][s]["value"] for s in ("mean", "worst_case")},
        "shadow_psnr": e["psnr"]["mean"]["shadows"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--shadows", default="3,5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for case in all_cases(100)[: args.cases]:
        for k in (int(x) for x in args.shadows.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "batched": []}
            for r in range(args.repeats):
                order = ("sequential", "batched") if r % 2 == 0 else ("batched", "sequential")
                for mode in order:
                    runs[mode].append(audit(case, args.size, args.iterations, k, mode == "batched"))
            seq = statistics.median(x["seconds"] for x in runs["sequential"])
            bat = statistics.median(x["seconds"] for x in runs["batched"])
            row = {
                "case": case["id"],
                "what": _what(case),
                "shadows": k,
                "execution": runs["batched"][0]["execution"],
                "seconds_sequential": seq,
                "seconds_batched": bat,
                "ratio_batched_over_sequential": bat / seq,
                "psnr_mean_sequential": runs["sequential"][0]["psnr"]["mean"],
                "psnr_mean_batched": runs["batched"][0]["psnr"]["mean"],
                "shadow_psnr_sequential": runs["sequential"][0]["shadow_psnr"],
                "shadow_psnr_batched": runs["batched"][0]["shadow_psnr"],
                "load_avg": list(os.getloadavg()),
            }
            rows.append(row)
            print(
                f"case {row['case']} K={k}: {seq:.2f}s one by one, {bat:.2f}s batched "
                f"({row['ratio_batched_over_sequential']:.2f}x; {row['execution'].split(' ')[0]}); "
                f"PSNR {row['psnr_mean_sequential']:.2f} / {row['psnr_mean_batched']:.2f}",
                flush=True,
            )
    summary = {}
    for k in sorted({r["shadows"] for r in rows}):
        mine = [r for r in rows if r["shadows"] == k]
        together = [r for r in mine if r["execution"].startswith("batched")]
        summary[f"K={k}"] = {
            "cases": len(mine),
            "cases_batched": len(together),
            "median_ratio_batched_over_sequential": statistics.median(
                r["ratio_batched_over_sequential"] for r in together
            )
            if together
            else None,
            "median_abs_psnr_difference_db": statistics.median(
                abs(r["psnr_mean_batched"] - r["psnr_mean_sequential"]) for r in mine
            ),
        }
    result = {
        "name": "verdict-shadows",
        "machine": {**machine(), "load_avg_now": list(os.getloadavg()), "torch_threads": 1},
        "command": "python -m bench.shadows "
        f"--cases {args.cases} --shadows {args.shadows} --repeats {args.repeats} "
        f"--iterations {args.iterations} --size {args.size}",
        "note": "the verdict's own seconds (estimate.elapsed_s), medians over repeats, the two modes "
        "alternating in one process; cases: bench.verdict's held-out grid (ids from 100)",
        "summary": summary,
        "rows": rows,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verdict-shadows-cpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
