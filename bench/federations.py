"""Federation benchmark: seconds per round, IGSA's cost against one attack iteration, peak memory,
and the per-round accuracy, IGSA and attack quality docs/federations.md shows.

Each case runs in a fresh process (so its peak RSS is its own) through the one runner, as
`gradleak federation run` would run it, and writes bench/results/federations-cpu.json with the
machine it ran on. Timings on a shared machine depend on what else runs there: the file records
the load average before and after each case.

    python -m bench.federations all            # every case, seeds 0 and 1
    python -m bench.federations all --cases lenet --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.attacks import machine

RESULTS = Path(__file__).parent / "results" / "federations-cpu.json"
ROUND_FIELDS = (
    "round", "test_accuracy", "igsa", "igsa_client", "psnr_mean", "psnr_worst", "ssim_mean", "label_accuracy",
    "train_s",
)  # fmt: skip
SUMMARY_FIELDS = (
    "s_per_round_median", "igsa_cost_in_attack_iterations", "attack_s_per_iteration_median",
    "igsa_client_s_median", "final_accuracy", "peak_rss_gib", "wall_s",
)  # fmt: skip

AUDIT = {
    "attack": {"name": "inverting_gradients"},
    "knowledge": 3,
    "budget": {"iterations": 300},
}
# Ten clients on the offline photo-patch task (ten photos, 60 patches each: 480 training and 120
# test images), FedAvg with one local epoch of mini-batches of 8, every client in every round.
CASES: dict[str, dict[str, Any]] = {
    "lenet": {
        "model": {"arch": "lenet"},
        "num_clients": 10,
        "rounds": 20,
        "client": {"protocol": "fedavg", "lr": 0.1, "batch_size": 8, "local_epochs": 1},
        "audit": {**AUDIT, "rounds": [1, 2, 5, 10, 20], "client": 0},
    },
    "convnet": {
        "model": {"arch": "convnet", "knobs": {"width": 32}},
        "num_clients": 10,
        "rounds": 20,
        "client": {"protocol": "fedavg", "lr": 0.05, "batch_size": 8, "local_epochs": 1},
        "audit": {**AUDIT, "rounds": [1, 2, 5, 10, 20], "client": 0},
    },
    "resnet18-w16": {
        "model": {"arch": "resnet18", "knobs": {"width": 16}},
        "num_clients": 10,
        "rounds": 10,
        "client": {"protocol": "fedavg", "lr": 0.05, "batch_size": 8, "local_epochs": 1, "bn_mode": "train"},
        "audit": {**AUDIT, "rounds": [1, 5, 10], "client": 0},
    },
}


def run_case(case: str, seed: int, out: Path) -> dict[str, Any]:
    """One federation in this process; returns the manifest's figures and this process's peak RSS."""
    import torch

    from service.federations.spec import FederationSpec
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.storage import LocalStore

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = FederationSpec.model_validate({**CASES[case], "seed": seed})
    prefix = f"{case}-seed{seed}"
    ctx = JobContext(job_id=prefix, store=LocalStore(out), prefix=prefix, resolve=lambda ref: b"")
    started = time.monotonic()
    manifest = run_job(spec, ctx).manifest
    rows = manifest["rounds"]
    audited = [r for r in rows if r.get("attack_s_per_iteration")]
    return {
        "case": case,
        "seed": seed,
        "spec": manifest["spec"],
        "wall_s": time.monotonic() - started,
        "s_per_round_median": statistics.median(r["train_s"] for r in rows),
        "igsa_probe_s_median": statistics.median(r["igsa_s"] for r in rows),
        "attack_s_per_iteration_median": statistics.median(r["attack_s_per_iteration"] for r in audited),
        "igsa_client_s_median": statistics.median(r["igsa_client_s"] for r in audited),
        "igsa_cost_in_attack_iterations": statistics.median(
            r["igsa_client_s"] / r["attack_s_per_iteration"] for r in audited
        ),
        "audit_images": audited[0]["audit_images"] if audited else None,
        "initial_accuracy": manifest["initial"]["test_accuracy"],
        "final_accuracy": manifest["final"]["test_accuracy"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rounds": [{k: r.get(k) for k in ROUND_FIELDS} for r in rows],
        "outputs": str(out / prefix),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["all", "one"])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-federations"))
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.mode == "one":
        print(json.dumps(run_case(cases[0], seeds[0], args.out)))
        return

    runs = []
    for case in cases:
        for seed in seeds:
            load = os.getloadavg()[0]
            cmd = [sys.executable, "-m", "bench.federations", "one", "--cases", case, "--seeds", str(seed),
                   "--out", str(args.out)]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["load_average_before"], run["load_average_after"] = load, os.getloadavg()[0]
            runs.append(run)
            print(
                f"{case} seed {seed}: {run['s_per_round_median']:.2f} s/round, accuracy "
                f"{run['initial_accuracy']:.2f} -> {run['final_accuracy']:.2f}, IGSA = "
                f"{run['igsa_cost_in_attack_iterations']:.2f} attack iterations, "
                f"peak {run['peak_rss_gib']:.2f} GiB",
                file=sys.stderr,
            )
    summary = {}
    for case in cases:
        mine = [r for r in runs if r["case"] == case]
        summary[case] = {key: statistics.median(r[key] for r in mine) for key in SUMMARY_FIELDS}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "federations",
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine(),
                "threads": int(os.environ.get("BENCH_THREADS", "2")),
                "cases": CASES,
                "summary_median_over_seeds": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
