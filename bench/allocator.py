"""What the job runner's glibc tuning (service/jobs/allocator.py) is worth on a CPU attack.

  python -m bench.allocator [--cases resnet18_b4,convnet_b1] [--iterations 150] [--repeats 3]

Runs the default attack for a fixed number of iterations with the tuning on and off
(GRADLEAK_MALLOC_TUNING), alternating, each run in its own subprocess, and reports per case the
medians over repeats of the seconds and minor page faults per iteration (steady state: the first
two iterations skipped) and the ratio off/on. Writes bench/results/allocator-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.attacks import CASES, RESULTS, machine, subprocess_run


def measure(cases: list[str], iterations: int, repeats: int) -> dict:
    rows: list[dict] = []
    for case in cases:
        for repeat in range(repeats):
            for tuning in (True, False):  # alternating, so drift hits both alike
                env = {"GRADLEAK_MALLOC_TUNING": str(tuning).lower()}
                r = subprocess_run(case, "default", iterations, None, env=env)
                rows.append(
                    {
                        "case": case,
                        "repeat": repeat,
                        "malloc_tuning": tuning,
                        "s_per_iteration_median": r["s_per_iteration_median"],
                        "minor_faults_per_iteration_median": r["minor_faults_per_iteration_median"],
                        "peak_rss_gib": round(r["peak_rss_gib"], 3),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for case in cases:

        def med(key: str, tuning: bool, case: str = case) -> float:
            return statistics.median(
                r[key] for r in rows if r["case"] == case and r["malloc_tuning"] is tuning
            )

        on, off = med("s_per_iteration_median", True), med("s_per_iteration_median", False)
        summary[case] = {
            "s_per_iteration": {
                "tuned": round(on, 4),
                "untuned": round(off, 4),
                "untuned_over_tuned": round(off / on, 3),
            },
            "minor_faults_per_iteration": {
                "tuned": med("minor_faults_per_iteration_median", True),
                "untuned": med("minor_faults_per_iteration_median", False),
            },
            "peak_rss_gib": {"tuned": med("peak_rss_gib", True), "untuned": med("peak_rss_gib", False)},
        }
    return {"summary": summary, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="resnet18_b4,convnet_b1")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "allocator-cpu.json")
    a = ap.parse_args()
    cases = a.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    result = {
        "benchmark": "glibc allocator tuning on/off, default attack, fixed iterations",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "iterations": a.iterations,
        "repeats": a.repeats,
        **measure(cases, a.iterations, a.repeats),
    }
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
