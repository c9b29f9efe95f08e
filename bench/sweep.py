"""Iteration-matched sweeps of the default attack's settings, across cases and seeds.

A wall-clock budget mixes the machine's speed into reconstruction quality, and one seed says
little: single runs of the same setting differ by up to 2 dB. A sweep fixes the iteration count
and repeats each setting over seeds, so settings can be compared on any machine:

  python -m bench.sweep --cases convnet_b1,resnet18_b4 --iterations 1000 --seeds 0,1 \\
      --variant '{}' --variant '{"lr": 0.2}' --jobs 2 --out bench/results/attacks-cpu-sweep.json

Each variant is a JSON object of Inverting Gradients parameters laid over the default attack.
Every run is its own single-threaded process (`--jobs` of them at a time) through the same
runner and benchmark cases as `bench.attacks`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.attacks import CASES, RESULTS, ROOT, machine, quality_fields, run_spec, spec_for


def run_one(case: str, iterations: int, variant: dict[str, Any], seed: int) -> dict[str, Any]:
    spec = spec_for(case, {"name": "inverting_gradients", **variant}, iterations, None, seed=seed)
    t0 = time.perf_counter()
    manifest = run_spec(spec, f"sweep-{case}-{os.getpid()}")
    return {
        "case": case,
        "iterations": manifest["attack"]["iterations"],
        "variant": variant,
        "seed": seed,
        **quality_fields(manifest),
        "wall_s": time.perf_counter() - t0,
    }


def subprocess_one(case: str, iterations: int, variant: dict[str, Any], seed: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.sweep", "one", case, str(iterations), json.dumps(variant), str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread of each (case, variant) over its seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["case"], json.dumps(r["variant"], sort_keys=True)), []).append(r["psnr_mean"])
    return [
        {
            "case": case,
            "variant": json.loads(variant),
            "seeds": len(v),
            "psnr_mean_over_seeds": statistics.fmean(v),
            "psnr_min": min(v),
            "psnr_max": max(v),
        }
        for (case, variant), v in groups.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="sweep", choices=["sweep", "one"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--cases", default="convnet_b1,resnet18_b1,resnet18_b4")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variant", action="append", default=None, help="JSON attack parameters (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "attacks-cpu-sweep.json")
    a = ap.parse_args()
    if a.mode == "one":
        case, its, variant, seed = a.args
        print(json.dumps(run_one(case, int(its), json.loads(variant), int(seed))))
        return
    cases = a.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    try:
        variants = [json.loads(v) for v in a.variant or ["{}"]]
    except json.JSONDecodeError as e:
        ap.error(f"--variant is not JSON: {e}")
    for v in variants:  # a misspelt parameter fails here, before any run starts
        try:
            spec_for(cases[0], {"name": "inverting_gradients", **v}, 1, None)
        except ValueError as e:
            ap.error(f"--variant {json.dumps(v)} is not a valid attack: {e}")
    plan = [(c, v, int(s)) for c in cases for v in variants for s in a.seeds.split(",")]

    def run(item: tuple[str, dict[str, Any], int]) -> dict[str, Any]:
        r = subprocess_one(item[0], a.iterations, item[1], item[2])
        print(json.dumps(r), file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(run, plan))
    report = {
        "machine": {**machine(), "torch_threads": 1, "parallel_runs": a.jobs},
        "date": time.strftime("%Y-%m-%d"),
        "iterations": a.iterations,
        "runs": rows,
        "summary": summarise(rows),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
