"""The FedAvg-aware attack against the default attack on the equivalent FedSGD gradient.

A client with one image takes U local SGD steps (batch 1, lr 0.05) and shares its weight change;
the FedAvg-aware attack (`fedavg_unroll`) replays those steps. The baseline is the default attack
(`inverting_gradients`) on the FedSGD gradient of the same image, model and labels, in the same
process and at the same iteration count. At U = 1 the shared change is exactly -lr times that
gradient, so the FedAvg-aware attack has the same information and should rebuild as well.

What the attacker is told of the client's training (`--facts`):
  exact    lr, local epochs, batch size and sample count (SoK Case 1)
  ranged   lr in [0.01, 0.1] and local epochs among 1, 2, 4, 8 (searched by the attack's own loss)
  unknown  nothing but the protocol: the attack searches its default plausible values

  python -m bench.fedavg run --steps 1,2,4,8 --facts exact,ranged,unknown --images camera,face42 \
      --seeds 0 --iterations 500 --jobs 3 --out bench/results/attacks-cpu-fedavg.json
  python -m bench.fedavg run ... --variant '{"tv_weight": 1e-4}' --no-baseline   # a sweep
  python -m bench.fedavg merge LOG... --out FILE   # the rows several runs printed, as one report
  python -m bench.fedavg table FILE                # its summary as a markdown table

Tuning photos (sweeps): TUNING; reports: HELD_OUT, which no sweep used. Labels are 0, 1, 2, ...
in the order the images are given (`--labels` to set them).
Every run is its own single-threaded process (`--jobs` at a time) through the job runner.
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

from bench.attacks import RESULTS, ROOT, machine, quality_fields, run_spec

ARCH = {"arch": "convnet", "knobs": {}}  # the registry's default ConvNet
CLIENT_LR = 0.05
# tuning photos (every sweep) and held-out ones (the report); labels are arbitrary but fixed
TUNING = ["astronaut", "coffee", "chelsea", "rocket"]
HELD_OUT = ["camera", "immunohistochemistry", "face42"]
FACTS: dict[str, dict[str, Any]] = {
    "exact": {},
    "ranged": {"lr": {"min": 0.01, "max": 0.1}, "local_epochs": [1, 2, 4, 8]},
    "unknown": {"lr": None, "local_epochs": None, "batch_size": None, "num_samples": None},
}


def spec_for(
    image: str, label: int, steps: int | None, facts: str, attack: dict[str, Any], iterations: int, seed: int
) -> Any:
    """steps None: the FedSGD baseline (default attack on the gradient); else a FedAvg client
    with `steps` local steps attacked by the FedAvg-aware attack told `facts`."""
    from service.specs import JobSpec

    data = {"shape": [3, 32, 32], "num_classes": 10, "normalization": "cifar10", "labels": [label]}
    if steps is None:
        training: dict[str, Any] = {"protocol": "fedsgd"}
        told: dict[str, Any] = {"protocol": "fedsgd"}
        kind, knowledge = "gradient", 1
    else:
        training = {
            "protocol": "fedavg",
            "lr": CLIENT_LR,
            "local_epochs": steps,
            "batch_size": 1,
            "num_samples": 1,
        }
        told = {**training, **FACTS[facts]}
        kind, knowledge = "delta", 3
    return JobSpec.model_validate(
        {
            "model": {**ARCH, "init_seed": 0},
            "update": {
                "kind": kind,
                "simulate": {"images": [image], "labels": [label], "training": training},
                "client": told,
            },
            "data": data,
            "knowledge": knowledge,
            "attack": attack,
            "budget": {"iterations": iterations, "restarts": 1},
            "seed": seed,
        }
    )


def run_one(
    image: str, label: int, steps: int | None, facts: str, variant: dict[str, Any], iterations: int, seed: int
) -> dict[str, Any]:
    attack = {"name": "inverting_gradients"} if steps is None else {"name": "fedavg_unroll", **variant}
    spec = spec_for(image, label, steps, facts, attack, iterations, seed)
    t0 = time.perf_counter()
    manifest = run_spec(spec, f"fedavg-{os.getpid()}")
    details = manifest["attack"].get("details", {})
    return {
        "image": image,
        "steps": steps,
        "facts": facts if steps is not None else "fedsgd_gradient",
        "attack": "fedavg_unroll" if steps is not None else "inverting_gradients (default)",
        "variant": variant if steps is not None else {},
        "seed": seed,
        "iterations": manifest["attack"]["iterations"],
        **quality_fields(manifest),
        "matching_cost": manifest["attack"].get("matching_cost"),
        "fedavg_case": details.get("fedavg_case"),
        "search": details.get("search"),
        "wall_s": time.perf_counter() - t0,
    }


def subprocess_one(*args: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.fedavg", "one", json.dumps(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over images and seeds of each (steps, facts, variant), and the gap to the baseline
    on the same (image, seed) pairs."""
    base = {(r["image"], r["seed"]): r["psnr_mean"] for r in rows if r["steps"] is None}
    groups: dict[tuple[Any, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["steps"], r["facts"], json.dumps(r["variant"], sort_keys=True)), []).append(r)
    out = []
    for (steps, facts, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1:])):
        gaps = [r["psnr_mean"] - base[(r["image"], r["seed"])] for r in rs if (r["image"], r["seed"]) in base]
        out.append(
            {
                "steps": steps,
                "facts": facts,
                "variant": json.loads(variant),
                "runs": len(rs),
                "psnr_median": statistics.median(r["psnr_mean"] for r in rs),
                "ssim_median": statistics.median(r["ssim_mean"] for r in rs),
                "psnr_min": min(r["psnr_mean"] for r in rs),
                "gap_to_fedsgd_default_db_median": statistics.median(gaps) if gaps else None,
                "gap_to_fedsgd_default_db_mean": statistics.fmean(gaps) if gaps else None,
            }
        )
    return out


def report(
    rows: list[dict[str, Any]], commands: list[str], jobs: int, load_before: Any, wall_s: float
) -> dict:
    return {
        "what": "FedAvg-aware attack (fedavg_unroll) on a one-image client taking U local SGD steps "
        f"(batch 1, lr {CLIENT_LR}), against the default attack on the FedSGD gradient of the same "
        "image, model (registry convnet, untrained, init_seed 0), labels (known) and seed; "
        "iteration-matched, 1 restart",
        "machine": {
            **machine(),
            "torch_threads": 1,
            "parallel_runs": jobs,
            "note": "2 cores, possibly shared with other benchmark runs (see the load averages); "
            "quality is iteration-matched, so the load only affects wall_s",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "command": commands,
        "facts": FACTS,
        "total_wall_s": wall_s,
        "summary": summarise(rows),
        "runs": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    """The summary as a table: PSNR (SSIM) medians per U and facts, next to the FedSGD default."""
    cells: dict[tuple[Any, str], dict[str, Any]] = {(r["steps"], r["facts"]): r for r in report["summary"]}
    base = cells.get((None, "fedsgd_gradient"))
    head = "| U | default attack, FedSGD gradient | exact facts | ranged facts | unknown facts |"
    lines = [head, "|---|---|---|---|---|"]
    for u in sorted({k[0] for k in cells if k[0] is not None}):
        row = [str(u), "" if base is None else f"{base['psnr_median']:.1f} dB ({base['ssim_median']:.2f})"]
        for facts in ("exact", "ranged", "unknown"):
            c = cells.get((u, facts))
            row.append(
                "not run"
                if c is None
                else f"{c['psnr_median']:.1f} dB ({c['ssim_median']:.2f}), {c['runs']} run(s)"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["run", "one", "merge", "table"])
    ap.add_argument("args", nargs="*", help="one: the run's JSON arguments; merge: run logs (JSON lines)")
    ap.add_argument("--steps", default="1,2,4,8", help="local steps U of the FedAvg client")
    ap.add_argument("--facts", default="exact", help="exact, ranged, unknown (comma-separated)")
    ap.add_argument("--images", default=",".join(TUNING))
    ap.add_argument("--labels", default=None, help="one label per image; default 0, 1, 2, ...")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--variant", action="append", default=None, help="JSON fedavg_unroll parameters")
    ap.add_argument("--no-baseline", action="store_true", help="skip the FedSGD default-attack runs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--command", action="append", default=None, help="merge: the commands the logs came from")
    ap.add_argument("--out", type=Path, default=RESULTS / "attacks-cpu-fedavg.json")
    a = ap.parse_args()
    if a.mode == "one":
        print(json.dumps(run_one(*json.loads(a.args[0]))))
        return
    if a.mode == "table":
        print(markdown(json.loads(Path(a.args[0]).read_text())))
        return
    if a.mode == "merge":  # rows printed by several (possibly interrupted) runs, into one report
        rows, seen = [], set()
        for log in a.args:
            for line in Path(log).read_text().splitlines():
                if line.startswith('{"image"'):
                    r = json.loads(line)
                    key = (
                        r["image"],
                        r["steps"],
                        r["facts"],
                        json.dumps(r["variant"]),
                        r["seed"],
                        r["iterations"],
                    )
                    if key not in seen:
                        seen.add(key)
                        rows.append(r)
        out = report(rows, a.command or [], a.jobs, None, sum(r["wall_s"] for r in rows))
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["summary"], indent=1))
        print(f"wrote {a.out}")
        return
    images = a.images.split(",")
    given = [int(v) for v in a.labels.split(",")] if a.labels else [i % 10 for i in range(len(images))]
    labels = dict(zip(images, given, strict=True))
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = [json.loads(v) for v in a.variant or ["{}"]]
    plan: list[tuple[Any, ...]] = []
    if not a.no_baseline:
        plan += [(im, labels[im], None, "exact", {}, a.iterations, s) for im in images for s in seeds]
    for u in (int(v) for v in a.steps.split(",")):
        for facts in a.facts.split(","):
            for v in variants:
                plan += [(im, labels[im], u, facts, v, a.iterations, s) for im in images for s in seeds]
    load_before = os.getloadavg()

    def run(item: tuple[Any, ...]) -> dict[str, Any]:
        r = subprocess_one(*item)
        print(json.dumps(r), file=sys.stderr, flush=True)
        return r

    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(run, plan))
    out = report(
        rows, ["python -m bench.fedavg " + " ".join(sys.argv[1:])], a.jobs, load_before, time.time() - t0
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
