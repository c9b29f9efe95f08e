"""The attack's Gauss-Newton finish (InvertingGradientsParams.finish_steps), measured.

On the FedSGD cases of the verdict benchmark (bench/verdict.py: LeNet, an MLP and a 2-block
ConvNet at 16x16; untrained, trained and federation-checkpoint weights; no defense, noise or
top-k; one or two images of sets the proxy never draws on), each client's update is attacked three
ways through the runner, scored against its images:

- `plain`: the default attack, `--iterations` (200);
- `finish`: the same, then `--steps` (8) finish steps;
- `time_matched`: the default attack with no iteration cap and the time limit the `finish` run
  took, at least one second (the same wall-clock spent on more Adam iterations instead).

The finish has no tuned constant (its step count, LSQR iterations, damping ladder and stopping gain
were set by reasoning); the calibration cases (ids 0-29, 200-217) and the held-out ones (118-135,
300-323) are reported apart all the same.

    python -m bench.finish [--split calibration|holdout] [--log FILE]   # cases appended as they end
    python -m bench.finish --summarize                                  # bench/results/finish-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.attacks import append_row, machine
from bench.verdict import FED_CALIBRATION, FED_HOLDOUT, all_cases, case_spec, federation_cases
from service.jobs.runner import run_job
from service.jobs.types import JobContext
from service.storage import LocalStore

RESULTS = Path(__file__).parent / "results"
LOG = RESULTS / "finish-cpu.jsonl"
# the verdict benchmark's splits (its results' command): ids 0-29 and the first 18 federation cases
# calibrate; all_cases(100)[18:36] and the first 24 federation cases of seed 1 are held out
CALIBRATION, FED_CALIBRATION_CASES = 30, 18
HELD_OUT_SKIP, HELD_OUT_END, FED_HOLDOUT_CASES = 18, 36, 24


def cases(split: str) -> list[dict[str, Any]]:
    """The split's FedSGD cases of the verdict benchmark."""
    if split == "calibration":
        pool = all_cases(0)[:CALIBRATION] + federation_cases(FED_CALIBRATION)[:FED_CALIBRATION_CASES]
    else:
        pool = all_cases(100)[HELD_OUT_SKIP:HELD_OUT_END] + federation_cases(FED_HOLDOUT)[:FED_HOLDOUT_CASES]
    return [c for c in pool if c["protocol"] == "fedsgd"]


def attack(case: dict[str, Any], iterations: int, budget: dict[str, Any], params: dict[str, Any]) -> dict:
    """One audit of the case with ground truth: its worst-case and mean PSNR, seconds, iterations run."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec, _ = case_spec(case, 16, iterations, 2, work)
        spec = spec.model_validate(
            {
                **spec.model_dump(mode="json"),
                "budget": budget,
                "attack": {**spec.attack.model_dump(mode="json"), **params},
                "verdict": {"when": "never"},
            }
        )
        started = time.monotonic()
        out = run_job(spec, JobContext("f", LocalStore(work / "store"), "j", lambda r: Path(r).read_bytes()))
        seconds = time.monotonic() - started
    m = out.manifest
    return {
        "psnr_worst_case": m["metrics"]["worst_case"]["psnr"],
        "psnr_mean": m["metrics"]["mean"]["psnr"],
        "seconds": seconds,
        "iterations": m["attack"].get("iterations"),
        "finish": (m["attack"].get("details") or {}).get("finish"),
    }


def run_case(case: dict[str, Any], iterations: int, steps: int) -> dict[str, Any]:
    plain = attack(case, iterations, {"iterations": iterations}, {})
    finished = attack(case, iterations, {"iterations": iterations}, {"finish_steps": steps})
    matched = attack(case, iterations, {"time_limit_s": max(finished["seconds"], 1.0)}, {})
    return {
        **case,
        "load_avg": list(os.getloadavg()),
        "plain": plain,
        "finish": finished,
        "time_matched": matched,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per split (and per batch size): median worst-case PSNR of each way, and how often the finish
    beats the time-matched run by more than 0.5 dB, ties within it, or loses."""
    out: dict[str, Any] = {}
    for split in ("calibration", "holdout"):
        for n in (1, 2):
            part = [r for r in rows if r["split"] == split and r["num_images"] == n]
            if not part:
                continue

            def med(way: str, part: list[dict[str, Any]] = part) -> float:
                return statistics.median(r[way]["psnr_worst_case"] for r in part)

            diff = [r["finish"]["psnr_worst_case"] - r["time_matched"]["psnr_worst_case"] for r in part]
            gain = [r["finish"]["psnr_worst_case"] - r["plain"]["psnr_worst_case"] for r in part]
            out[f"{split}_batch{n}"] = {
                "cases": len(part),
                "median_psnr_worst_case": {w: med(w) for w in ("plain", "finish", "time_matched")},
                "finish_over_plain_db": {
                    "median": statistics.median(gain),
                    "min": min(gain),
                    "max": max(gain),
                },
                "finish_vs_time_matched": {
                    "wins": sum(d > 0.5 for d in diff),
                    "ties": sum(abs(d) <= 0.5 for d in diff),
                    "losses": sum(d < -0.5 for d in diff),
                    "median_db": statistics.median(diff),
                },
                "finish_applied_cases": sum(1 for r in part if (r["finish"]["finish"] or {}).get("applied")),
                "median_seconds": {
                    w: statistics.median(r[w]["seconds"] for r in part) for w in ("plain", "finish")
                },
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("calibration", "holdout"), default="holdout")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--log", help="append the cases here (one file per parallel run)")
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = Path(args.log) if args.log else LOG
    if not args.summarize:
        for case in cases(args.split):
            row = run_case(case, args.iterations, args.steps)
            append_row(log, row)
            print(
                f"case {row['id']} {row['arch']} x{row['num_images']} {row['defense']}: plain "
                f"{row['plain']['psnr_worst_case']:.1f}, finish {row['finish']['psnr_worst_case']:.1f}, "
                f"time-matched {row['time_matched']['psnr_worst_case']:.1f} dB",
                flush=True,
            )
        return
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    loads = [r["load_avg"][0] for r in rows]
    result = {
        "name": "finish",
        "machine": {
            **machine(),
            "note": "two runs at once, torch on one thread each; the time-matched runs' budgets are the "
            "finish runs' seconds, measured under that load; each case's load average is in its row",
            "load_avg_1min_over_cases": {"median": statistics.median(loads), "max": max(loads)},
        },
        "command": "python -m bench.finish --split calibration --log A; python -m bench.finish --split "
        "holdout --log B (at once); the files joined into bench/results/finish-cpu.jsonl; then "
        "python -m bench.finish --summarize",
        "settings": {"iterations": 200, "finish_steps": 8, "size": 16},
        "summary": summarize(rows),
        "rows": rows,
    }
    (RESULTS / "finish-cpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
