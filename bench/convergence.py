"""How many iterations does the attack need on each architecture? Calibrates the gate's warning.

For each case the default attack runs at growing iteration budgets (same seed, same start). A
run "fell short" when it ended more than SHORT_DB below the same case's largest budget; the
smallest budget that did not is what the case needs (a lower bound when it is the largest
budget run), and an architecture needs the most any of its cases needs
(service/jobs/convergence.py's NEEDED_ITERATIONS). Each run also records the relative drop of
its best loss over the last 10%, 25% and 50% of its iterations: the measure a run could take of
itself, kept to show whether it separates the runs that fell short.

  python -m bench.convergence --jobs 2      # writes bench/results/convergence-cpu.json
  python -m bench.convergence --jobs 2 --add resnet18_b1:1600   # one more budget, added to it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.attacks import CASES, RESULTS, ROOT, machine, quality_fields, run_spec, spec_for
from service.jobs.convergence import SHORT_DB

PLAN: dict[str, list[int]] = {
    "lenet_b1": [25, 50, 100, 200, 400, 800],
    "resnet18_b1": [25, 50, 100, 200, 400, 800],
    "resnet18_b4": [25, 50, 100, 200, 400],
}
FRACTIONS = (0.1, 0.25, 0.5)


def tail_improvement(history: list[float], fraction: float) -> float | None:
    """Relative drop of the best loss so far over the last `fraction` of the run."""
    values = [v for v in history if math.isfinite(v)]
    start = min(len(values) - 1, max(1, math.floor(len(values) * (1 - fraction))))
    if len(values) < 8:
        return None
    before = min(values[:start])
    return (before - min(before, *values[start:])) / abs(before) if before else 0.0


def run_one(case: str, iterations: int, seed: int) -> dict[str, Any]:
    from service.tensorio import load_safetensors

    name = f"convergence-{case}-{iterations}-{os.getpid()}"
    spec = spec_for(case, {"name": "inverting_gradients"}, iterations, None, seed=seed)
    t0 = time.perf_counter()
    manifest = run_spec(spec, name)
    store = Path(os.environ.get("TMPDIR", "/tmp")) / "gradleak-bench" / "bench" / name
    data = (store / "reconstruction.safetensors").read_bytes()
    history = load_safetensors(data, allowed_dtypes=("F32", "I64"))["loss_history"].tolist()
    return {
        "case": case,
        "iterations": iterations,
        "seed": seed,
        **quality_fields(manifest),
        "best_loss": manifest["attack"]["best_loss"],
        "tail_improvement": {str(f): tail_improvement(history, f) for f in FRACTIONS},
        "wall_s": time.perf_counter() - t0,
    }


def subprocess_one(case: str, iterations: int, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.convergence", "one", case, str(iterations), str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def judge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mark each run short of its case's largest budget or not; what each case and architecture
    needs; and, per tail fraction, whether the runs' own loss drop separates the two groups."""
    largest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["iterations"] > largest.get(r["case"], {"iterations": -1})["iterations"]:
            largest[r["case"]] = r
    for r in rows:
        r["short_of_largest_db"] = largest[r["case"]]["psnr_mean"] - r["psnr_mean"]
        r["fell_short"] = r["short_of_largest_db"] > SHORT_DB
    needed: dict[str, dict[str, Any]] = {}
    for case, top in largest.items():
        enough = min(r["iterations"] for r in rows if r["case"] == case and not r["fell_short"])
        needed[case] = {"iterations": enough, "lower_bound": enough == top["iterations"]}
    by_arch: dict[str, int] = {}
    for case, n in needed.items():
        arch = CASES[case]["arch"]
        by_arch[arch] = max(by_arch.get(arch, 0), n["iterations"])
    separation = {}
    for f in map(str, FRACTIONS):
        short = [r["tail_improvement"][f] for r in rows if r["fell_short"]]
        settled = [r["tail_improvement"][f] for r in rows if not r["fell_short"]]
        separation[f] = {
            "fell_short_min": min(short) if short else None,
            "settled_max": max(settled) if settled else None,
            "separates": bool(short and settled and min(short) > max(settled)),
        }
    return {"needed_by_case": needed, "needed_by_architecture": by_arch, "tail_separation": separation}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        _, _, case, iterations, seed = sys.argv
        print(json.dumps(run_one(case, int(iterations), int(seed))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "convergence-cpu.json")
    ap.add_argument(
        "--add", action="append", metavar="CASE:ITERATIONS", help="run only these and add them to --out"
    )
    args = ap.parse_args()
    plan = [(case, its) for case, budgets in PLAN.items() for its in budgets]
    previous: list[dict[str, Any]] = []
    if args.add:
        plan = [(a.split(":")[0], int(a.split(":")[1])) for a in args.add]
        previous = json.loads(args.out.read_text())["runs"]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = previous + list(pool.map(lambda p: subprocess_one(p[0], p[1], args.seed), plan))
    rows.sort(key=lambda r: (r["case"], r["iterations"]))
    verdict = judge(rows)
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "attack": "inverting_gradients (defaults)",
        "short_db": SHORT_DB,
        **verdict,
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(verdict, indent=2))
    for r in rows:
        ti = r["tail_improvement"]
        print(
            f"{r['case']:<12} {r['iterations']:>5} it  PSNR {r['psnr_mean']:6.2f}  "
            f"short {r['short_of_largest_db']:5.2f} dB  " + "  ".join(f"tail{f}={ti[f]:.4f}" for f in ti)
        )


if __name__ == "__main__":
    main()
