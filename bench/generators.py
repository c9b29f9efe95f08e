"""Generators trained on this machine's CPUs: how far `gradleak generator train` gets in 20
minutes of wall-clock on the shared 2-core machine, and what one step costs with 1 and 2 torch
threads under that load.

    python -m bench.generators threads --repeats 2 --steps 4          # step cost, 1 vs 2 threads
    python -m bench.generators report --faces RUN --patches RUN       # write the JSON and PNGs

`report` reads the runs' checkpoints (state.json: history with wall-clock and CPU seconds per
logged step) and their per-checkpoint sample grids, copies the grid nearest to the 20-minute
mark and the final grid to bench/results/, and writes bench/results/generators-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.attacks import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET_S = 1200.0  # the 20 minutes

_STEP_SCRIPT = """
import json, sys, time, torch
from service.generators.train import _Run, TrainConfig, training_data
torch.set_num_threads(int(sys.argv[1]))
cfg = TrainConfig(data="faces", steps=100, batch_size=32, width=32)
run = _Run(cfg, training_data(cfg), torch.device("cpu"))
run.train_step()
t, c = time.perf_counter(), time.process_time()
for _ in range(int(sys.argv[2])):
    run.train_step()
n = int(sys.argv[2])
wall, cpu = (time.perf_counter() - t) / n, (time.process_time() - c) / n
print(json.dumps({"wall_s_per_step": wall, "cpu_s_per_step": cpu}))
"""


def step_cost(threads: int, steps: int) -> dict[str, float]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", _STEP_SCRIPT, str(threads), str(steps)],
        check=True, capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def threads(repeats: int, steps: int) -> dict[str, Any]:
    """Alternate 1- and 2-thread runs (same data, model, batch) so that both see the same load."""
    rows: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    loads = [os.getloadavg()]
    for _ in range(repeats):
        for n in (1, 2):
            rows[n].append(step_cost(n, steps))
            loads.append(os.getloadavg())
    summary = {
        f"{n}_threads": {
            "median_wall_s_per_step": statistics.median(r["wall_s_per_step"] for r in rs),
            "median_cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in rs),
            "runs": rs,
        }
        for n, rs in rows.items()
    }
    return {
        "what": "one training step of the 32x32 DCGAN (width 32, batch 32) on faces, 1 vs 2 torch threads, "
        "alternated in subprocesses so that both see the same load",
        "steps_per_run": steps,
        "repeats": repeats,
        "load_averages": loads,
        **summary,
    }


def _run_summary(out: Path) -> dict[str, Any]:
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    history = state["history"]
    at_target = [h for h in history if h["elapsed_s"] <= TARGET_S]
    mark = at_target[-1] if at_target else None
    return {
        "config": state["config"],
        "manifest": state["manifest"],
        "steps": state["step"],
        "wall_s": round(state["elapsed_s"], 1),
        "cpu_s": round(state.get("cpu_s", 0.0), 1),
        "steps_per_wall_s": round(state["step"] / state["elapsed_s"], 3) if state["elapsed_s"] else None,
        "cpu_s_per_step": round(state.get("cpu_s", 0.0) / state["step"], 4) if state["step"] else None,
        "at_20_minutes": mark,
        "history_every_500_steps": [h for h in history if h["step"] % 500 == 0],
    }


def _nearest_grid(out: Path, step: int) -> Path:
    grids = sorted((out / "samples").glob("step-*.png"))
    return min(grids, key=lambda p: abs(int(p.stem.split("-")[1]) - step))


def report(args: argparse.Namespace) -> None:
    runs: dict[str, Any] = {}
    for name, out in (("faces", args.faces), ("patches", args.patches)):
        summary = _run_summary(out)
        shutil.copyfile(out / "samples.png", RESULTS / f"generator-{name}-samples.png")
        if summary["at_20_minutes"] is not None:
            grid = _nearest_grid(out, summary["at_20_minutes"]["step"])
            shutil.copyfile(grid, RESULTS / f"generator-{name}-samples-20min.png")
            summary["grid_at_20_minutes"] = f"bench/results/generator-{name}-samples-20min.png ({grid.stem})"
        summary["grid"] = f"bench/results/generator-{name}-samples.png"
        summary["command"] = args.commands.get(name) if args.commands else None
        runs[name] = summary
    loads = []
    if args.load_log and args.load_log.exists():
        for line in args.load_log.read_text().splitlines():
            parts = line.split()
            loads.append(
                {
                    "t": int(parts[0]),
                    "load1": float(parts[1]),
                    "load5": float(parts[2]),
                    "load15": float(parts[3]),
                }
            )
    result: dict[str, Any] = {
        "benchmark": "gradleak generator train on CPU: 32x32 DCGAN on faces and on photo patches",
        "machine": {
            **machine(),
            "note": "2 CPU cores shared with other work (other benchmarks and test suites ran at the same "
            "time; load averages far above 2): wall-clock figures are this machine under this load, CPU "
            "seconds are the process's own",
            "load_averages_now": os.getloadavg(),
        },
        "target": "recognisable samples within 20 minutes on 2 CPU cores (issue 21)",
        "runs": runs,
        "load_during_runs": {
            "samples": len(loads),
            "median_load1": statistics.median(x["load1"] for x in loads) if loads else None,
            "max_load1": max(x["load1"] for x in loads) if loads else None,
            "every_30s": loads,
        },
        "threads": json.loads(args.threads.read_text()) if args.threads and args.threads.exists() else None,
        "judgement": args.judgement,
        "reproduce": "the runs' commands, then python -m bench.generators report --faces RUN --patches RUN; "
        "python -m bench.generators threads --repeats 2 --steps 4 > threads.json",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (RESULTS / "generators-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(RESULTS / "generators-cpu.json")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("threads")
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--steps", type=int, default=4)
    r = sub.add_parser("report")
    r.add_argument("--faces", type=Path, required=True)
    r.add_argument("--patches", type=Path, required=True)
    r.add_argument("--load-log", type=Path)
    r.add_argument("--threads", type=Path, help="the JSON `threads` printed")
    r.add_argument("--commands", type=json.loads, help='JSON {"faces": "...", "patches": "..."}')
    r.add_argument("--judgement", default=None, help="what the grids show, judged by eye")
    args = parser.parse_args()
    if args.cmd == "threads":
        print(json.dumps(threads(args.repeats, args.steps), indent=1))
    else:
        report(args)


if __name__ == "__main__":
    main()
