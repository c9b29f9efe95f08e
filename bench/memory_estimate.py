"""The job memory estimate (service/jobs/budget.py) against the real peak RSS of runs.

  python -m bench.memory_estimate [--cases resnet18_32_b1,...] [--iterations 3]

Each case is a simulated client on the shipped photos (FedSGD, labels known) attacked by the
default attack for a few iterations through the job runner, in its own subprocess, so that the
peak RSS (ru_maxrss) is that whole job's: imports, model build, client simulation, label
handling, the attack's second-order graph, scoring and artifacts. Writes
bench/results/memory-estimate-cpu.json: per case the estimate, the measured peak and their
ratio, and over all cases the smallest and largest ratio (the estimate is meant to be an upper
bound: ratio >= 1, within the largest ratio stated there).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from bench.attacks import RESULTS, ROOT, machine

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "horse", "clock"]

# name -> arch, knobs, image side, images, restarts
CASES: dict[str, tuple[str, dict[str, Any], int, int, int]] = {
    "lenet_32_b1": ("lenet", {}, 32, 1, 1),
    "mlp_32_b4": ("mlp", {}, 32, 4, 1),
    "convnet_64_b2": ("convnet", {}, 64, 2, 1),
    "igconvnet_32_b1": ("igconvnet", {"width": 64}, 32, 1, 1),
    "igconvnet_32_b4_r2": ("igconvnet", {"width": 64}, 32, 4, 2),
    "resnet18_32_b1": ("resnet18", {"stem": "cifar"}, 32, 1, 1),
    "resnet18_32_b4": ("resnet18", {"stem": "cifar"}, 32, 4, 1),
    "resnet18_64_b2_r2": ("resnet18", {"stem": "cifar"}, 64, 2, 2),
    "resnet18_128_b1": ("resnet18", {"stem": "cifar"}, 128, 1, 1),
    "resnet50_32_b2": ("resnet50", {"stem": "cifar"}, 32, 2, 1),
    "resnet152_32_b1": ("resnet152", {"stem": "cifar"}, 32, 1, 1),
    "vgg11_64_b2": ("vgg11", {}, 64, 2, 1),
    "densenet121_32_b1": ("densenet121", {}, 32, 1, 1),
    "googlenet_32_b2": ("googlenet", {}, 32, 2, 1),
}


def spec_for(case: str, iterations: int) -> Any:
    from service.specs import JobSpec

    arch, knobs, side, n, restarts = CASES[case]
    return JobSpec.model_validate(
        {
            "model": {"arch": arch, "knobs": knobs},
            "update": {
                "kind": "gradient",
                "simulate": {
                    "source": "photos",
                    "images": PHOTOS[:n],
                    "labels": list(range(n)),
                    "training": {"protocol": "fedsgd", "bn_mode": "eval"},
                },
                "client": {"bn_mode": "eval"},
            },
            "data": {"shape": [3, side, side], "num_classes": 10, "labels": list(range(n))},
            "knowledge": 1,
            "budget": {"iterations": iterations, "restarts": restarts},
        }
    )


def one(case: str, iterations: int) -> dict[str, Any]:
    """Run the case's job in this process; its peak RSS."""
    import tempfile

    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.storage import LocalStore

    spec = spec_for(case, iterations)
    with tempfile.TemporaryDirectory() as tmp:
        # a simulated client: the spec names no uploads to resolve
        ctx = JobContext(job_id="bench", store=LocalStore(tmp), prefix="bench", resolve=lambda ref: b"")
        started = time.monotonic()
        manifest = run_job(spec, ctx).manifest
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "iterations": manifest["attack"]["iterations"],
        "seconds": round(time.monotonic() - started, 2),
    }


def measure(cases: list[str], iterations: int) -> dict[str, Any]:
    from service.jobs.budget import estimate_memory

    rows = []
    for case in cases:
        estimate = estimate_memory(spec_for(case, iterations))
        cmd = [sys.executable, "-m", "bench.memory_estimate", "one", case, f"--iterations={iterations}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        arch, knobs, side, n, restarts = CASES[case]
        row = {
            "case": case,
            "arch": arch,
            "knobs": knobs,
            "image_side": side,
            "images": n,
            "restarts": restarts,
            "estimate_bytes": estimate.total_bytes,
            "measured_peak_rss_bytes": run["peak_rss_bytes"],
            "estimate_over_measured": round(estimate.total_bytes / run["peak_rss_bytes"], 3),
            "estimate": estimate.to_dict(),
            "iterations": run["iterations"],
            "seconds": run["seconds"],
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("case", "estimate_over_measured")}), flush=True)
    ratios = [r["estimate_over_measured"] for r in rows]
    return {
        "benchmark": "memory-estimate",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "iterations": iterations,
        "summary": {
            "cases": len(rows),
            "min_estimate_over_measured": min(ratios),
            "max_estimate_over_measured": max(ratios),
            "upper_bound_everywhere": min(ratios) >= 1.0,
        },
        "cases": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "one"])
    parser.add_argument("case", nargs="?")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "memory-estimate-cpu.json"))
    args = parser.parse_args()
    if args.mode == "one":
        print(json.dumps(one(args.case, args.iterations)))
        return
    result = measure(args.cases.split(","), args.iterations)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
