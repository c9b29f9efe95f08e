"""Study benchmark: the overhead of running points as a study over running the same jobs directly.

Direct: each point's JobSpec through the one runner (`run_job`), as `gradleak attack` runs it.
Study: the same points submitted as a study to a SQLite store and run by `execute_job` on the study
record (claims, leases and heartbeats, progress, the points' records) plus the aggregation (table,
plots in PNG and SVG, report). Both in one process, alternating, median over repeats; writes
bench/results/studies-cpu.json with the machine and the load average around each repeat.

On a shared machine the two totals vary more from run to run than the study adds, so the file
also reports the study's own time: its total minus the time its points ran (as their records
say), as a fraction of the total; that difference is what a study costs beyond its jobs.

    python -m bench.studies --points 6 --iterations 150 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.attacks import machine

RESULTS = Path(__file__).parent / "results" / "studies-cpu.json"


def study_spec(points: int, iterations: int) -> Any:
    from service.studies.spec import StudySpec

    images = ["astronaut", "coffee", "chelsea", "camera", "clock", "coins", "rocket", "brick"]
    job = {
        "model": {"arch": "convnet", "knobs": {"width": 16, "depth": 2}},
        "data": {"shape": [3, 16, 16], "labels": [0]},
        "update": {"simulate": {"images": ["astronaut"], "labels": [0]}},
        "attack": {"name": "inverting_gradients"},
        "budget": {"iterations": iterations},
    }
    return StudySpec.model_validate(
        {
            "title": "overhead",
            "job": job,
            "axes": [
                {"path": "update.simulate.images", "name": "image", "values": [[i] for i in images[:points]]}
            ],
        }
    )


def direct(spec: Any, folder: Path) -> float:
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.storage import LocalStore
    from service.studies.spec import expand

    store = LocalStore(folder)
    t = time.perf_counter()
    for p in expand(spec):
        ctx = JobContext(job_id=f"p{p.index}", store=store, prefix=f"direct/p{p.index}", resolve=bytes)
        run_job(p.spec, ctx)
    return time.perf_counter() - t


def as_study(spec: Any, folder: Path) -> tuple[float, float]:
    from service.jobs.execute import execute_job
    from service.jobs.state_sqlite import SQLiteStateStore
    from service.settings import Settings
    from service.storage import LocalStore
    from service.studies.submit import create_study

    state = SQLiteStateStore(folder / "state.db")
    settings = Settings(data_dir=folder, redis_url=None, s3_endpoint=None)
    t = time.perf_counter()
    record, points, _ = create_study(spec, "bench", settings, state)
    execute_job(record.id, state=state, store=LocalStore(folder), worker_id="bench")
    total = time.perf_counter() - t
    done = state.get_job(None, record.id)
    assert done.status.value == "succeeded", done.error
    in_points = sum(
        (j.finished_at or 0) - (j.started_at or 0) for j in (state.get_job(None, p.id) for p in points)
    )
    state.close()
    return total, in_points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = study_spec(args.points, args.iterations)
    with tempfile.TemporaryDirectory() as tmp:
        direct(spec, Path(tmp) / "warm")  # imports, first-call allocations
        runs = []
        for r in range(args.repeats):
            load = os.getloadavg()[0]
            d = direct(spec, Path(tmp) / f"d{r}")
            s, in_points = as_study(spec, Path(tmp) / f"s{r}")
            runs.append(
                {"direct_s": d, "study_s": s, "study_points_s": in_points, "overhead": s / d - 1,
                 "study_own_s": s - in_points, "study_own_fraction": (s - in_points) / s,
                 "load_before": load, "load_after": os.getloadavg()[0]}
            )  # fmt: skip
            print(f"repeat {r}: direct {d:.1f} s, study {s:.1f} s ({s / d - 1:+.1%})", file=sys.stderr)
    summary = {
        "direct_s_median": statistics.median(r["direct_s"] for r in runs),
        "study_s_median": statistics.median(r["study_s"] for r in runs),
        "overhead_median": statistics.median(r["overhead"] for r in runs),
        "study_own_s_median": statistics.median(r["study_own_s"] for r in runs),
        "study_own_fraction_median": statistics.median(r["study_own_fraction"] for r in runs),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "studies",
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine(),
                "points": args.points,
                "iterations": args.iterations,
                "summary_median_over_repeats": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(json.dumps(summary, indent=2), file=sys.stderr)
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
