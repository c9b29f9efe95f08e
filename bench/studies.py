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

`--batched` measures instead whether the points of a study that share one model (here: one
image each, the content preset's shape) run faster as one batched computation than one by one,
iteration-matched in one process: one by one is the attack as a point runs it (Inverting
Gradients, one restart: plain autograd with the convolution taps); batched stacks the points
like restarts (torch.func.vmap over the images and the targets, the restarts' path) with the
same objective (relative L2 matching plus TV per image) and the same signed Adam. It adds a
`batched_points` section to the same file.

    python -m bench.studies --batched --points 4 8 --iterations 40 --repeats 3
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


POINT_IMAGES = ["astronaut", "coffee", "chelsea", "camera", "clock", "coins", "rocket", "brick"]


def shared_model_problems(points: int, side: int = 16, width: int = 16, depth: int = 2) -> list[Any]:
    """The attack problems of `points` FedSGD clients of one image each on one ConvNet, through
    the runner's own problem construction (labels given)."""
    import torch

    from service.jobs.runner import _victim, problem_for
    from service.jobs.types import JobContext
    from service.models import build_model
    from service.specs import JobSpec
    from service.storage import LocalStore

    problems = []
    for i in range(points):
        name = POINT_IMAGES[i % len(POINT_IMAGES)]
        spec = JobSpec.model_validate(
            {
                "model": {"arch": "convnet", "knobs": {"width": width, "depth": depth}},
                "data": {"shape": [3, side, side], "labels": [i % 10]},
                "update": {"simulate": {"images": [name], "labels": [i % 10]}},
                "attack": {"name": "inverting_gradients"},
            }
        )
        model = build_model(spec.model, spec.data)
        ctx = JobContext(job_id=f"b{i}", store=LocalStore(tempfile.mkdtemp()), prefix="b", resolve=bytes)
        gen = torch.Generator().manual_seed(0)
        victim = _victim(spec, model, ctx, gen, torch.device("cpu"))
        problems.append((spec, problem_for(spec, model, victim, gen, torch.device("cpu"))))
    return problems


def one_by_one(problems: list[Any], iterations: int, starts: Any) -> tuple[float, list[float]]:
    """Each point's attack as it runs in a job (one restart), from the given start images."""
    import torch

    from service.attacks.base import Control
    from service.attacks.inverting import inverting_objective
    from service.attacks.optimize import OptimState, optimise
    from service.specs import Budget

    t = time.perf_counter()
    first = []
    for (spec, problem), start in zip(problems, starts, strict=True):
        control = Control(Budget(iterations=iterations, restarts=1))
        objective = inverting_objective(problem, spec.attack, control)
        init = OptimState(start.clone(), problem.labels.expand(1, -1).clone(), joint_labels=False)
        result = optimise(problem, spec.attack, control, torch.Generator(), objective, init=init)
        first.append(result.loss_history[0])
    return time.perf_counter() - t, first


def batched_objective(problem: Any, params: Any) -> Any:
    """One point's Inverting Gradients objective (relative L2, TV per image) with its target an
    argument, so that points sharing the model vectorise over targets as restarts do."""
    from torch.func import functional_call, grad

    from kernels import total_variation
    from service.attacks.inverting import attack_model, soft_cross_entropy

    model = attack_model(problem)
    names = problem.param_names
    weights = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    tv = params.tv_weight * problem.num_images

    def client_loss(w, x, y):  # type: ignore[no-untyped-def]
        return soft_cross_entropy(functional_call(model, (w, buffers), (x,)), y)

    def objective(x, y, targets, norm):  # type: ignore[no-untyped-def]
        g = grad(client_loss)(weights, x, y)
        match = sum((g[n] - t).pow(2).sum() for n, t in zip(names, targets, strict=True)) / norm
        return match + tv * total_variation(x)

    return objective


def all_at_once(problems: list[Any], iterations: int, starts: Any) -> tuple[float, list[float]]:
    """The points stacked like restarts: one vmapped objective over images and targets, one
    signed Adam over the stack (elementwise: P independent Adams), the same schedule and box."""
    import torch
    from torch.func import grad_and_value, vmap

    from service.attacks.base import lr_factor

    spec, problem = problems[0]
    params = spec.attack
    objective = batched_objective(problem, params)
    step = vmap(grad_and_value(objective), in_dims=(0, 0, 0, 0))
    targets = [torch.stack([p.target[i] for _, p in problems]) for i in range(len(problem.target))]
    norms = torch.stack([sum(t.double().pow(2).sum() for t in p.target).float() for _, p in problems])
    labels = torch.stack([p.labels for _, p in problems])
    lo, hi = problem.pixel_bounds()
    t = time.perf_counter()
    images = torch.stack([s[0] for s in starts]).clone()
    opt = torch.optim.Adam([images], lr=params.lr)
    first: list[float] = []
    for it in range(iterations):
        for g in opt.param_groups:
            g["lr"] = params.lr * lr_factor(params.schedule, it / iterations)
        grads, losses = step(images, labels, targets, norms)
        if it == 0:
            first = [float(v) for v in losses]
        images.grad = grads.sign()
        opt.step()
        with torch.no_grad():
            images.data = torch.maximum(torch.minimum(images, hi), lo)
    return time.perf_counter() - t, first


def _verdict(rows: list[dict[str, Any]]) -> str:
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        wins = [
            r["points"] for r in mine if r["points"] > 1 and r["median_ratio_batched_over_one_by_one"] < 1
        ]
        parts.append(
            f"{model}: batched is faster from {min(wins)} points"
            if wins
            else f"{model}: batched is not faster"
        )
    return "; ".join(parts) + " (on CPU; a single point is faster alone)"


def batched_main(
    point_counts: list[int], iterations: int, repeats: int, width: int, depth: int, side: int
) -> None:
    import torch

    from service.attacks.base import random_images

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    rows = []
    for points in point_counts:
        problems = shared_model_problems(points, side, width, depth)
        gen = torch.Generator().manual_seed(1)
        starts = [random_images((1, 1, 3, side, side), "rand", gen, torch.device("cpu")) for _ in problems]
        one_by_one(problems, 3, starts), all_at_once(problems, 3, starts)  # warm-up
        runs = []
        for r in range(repeats):
            load = os.getloadavg()[0]
            seq_s, seq_first = one_by_one(problems, iterations, starts)
            bat_s, bat_first = all_at_once(problems, iterations, starts)
            # the same problems from the same start: the first iteration's losses agree
            agree = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(seq_first, bat_first, strict=True))
            runs.append(
                {"one_by_one_s": seq_s, "batched_s": bat_s, "batched_over_one_by_one": bat_s / seq_s,
                 "first_loss_max_rel_diff": agree, "load_before": load, "load_after": os.getloadavg()[0]}
            )  # fmt: skip
            print(
                f"{points} points, repeat {r}: one by one {seq_s:.2f} s, batched {bat_s:.2f} s",
                file=sys.stderr,
            )
        rows.append(
            {
                "model": f"convnet width {width} depth {depth}, {side}x{side} images",
                "points": points,
                "iterations": iterations,
                "median_one_by_one_s": statistics.median(x["one_by_one_s"] for x in runs),
                "median_batched_s": statistics.median(x["batched_s"] for x in runs),
                "median_ratio_batched_over_one_by_one": statistics.median(
                    x["batched_over_one_by_one"] for x in runs
                ),
                "runs": runs,
            }
        )
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmark": "studies"}
    before = data.get("batched_points") or {}
    mine = {r["model"] for r in rows}
    command = (
        f"BENCH_THREADS={threads} python -m bench.studies --batched "
        f"--points {' '.join(map(str, point_counts))} --iterations {iterations} --repeats {repeats} "
        f"--width {width} --depth {depth} --side {side}"
    )
    rows = [r for r in before.get("rows", []) if r.get("model") not in mine] + rows
    commands = [
        c
        for c in before.get("commands", [before.get("command")])
        if c and f"--width {width} --depth {depth} --side {side}" not in c
    ]
    data["batched_points"] = {
        "built": "yes: StudySpec.batch_points (service/studies/batch.py); the content preset sets 8",
        "date": time.strftime("%Y-%m-%d"),
        "question": "for a study whose points share one model, is one batched computation over the "
        "points faster than running them one by one?",
        "setup": "ConvNet (width 16 depth 2 on 16x16 images, and width 64 depth 3 on 32x32: each row's "
        "model), one image per point, labels given; "
        "Inverting Gradients' objective (relative L2 + TV per image) and signed Adam; one by one = "
        "the attack as a job runs it (one restart, plain autograd with the convolution taps); "
        "batched = torch.func.vmap over the points' images and targets, as restarts are batched",
        "machine": {**machine(), "note": "2 cores shared with other work; load averages per repeat"},
        "torch_threads": threads,
        "rows": rows,
        "verdict": _verdict(rows),
        "commands": [*commands, command],
    }
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in data["batched_points"].items() if k != "rows"}, indent=2),
        file=sys.stderr,
    )
    print([(r["points"], round(r["median_ratio_batched_over_one_by_one"], 3)) for r in rows], file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, nargs="+", default=[6])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batched", action="store_true", help="measure batched points instead")
    parser.add_argument("--width", type=int, default=16, help="--batched: the ConvNet's width")
    parser.add_argument("--depth", type=int, default=2, help="--batched: the ConvNet's depth")
    parser.add_argument("--side", type=int, default=16, help="--batched: the images' side")
    args = parser.parse_args()
    if args.batched:
        batched_main(args.points, args.iterations, args.repeats, args.width, args.depth, args.side)
        return
    args.points = args.points[0]
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
    kept = json.loads(RESULTS.read_text()).get("batched_points") if RESULTS.exists() else None
    RESULTS.write_text(
        json.dumps(
            {
                **({"batched_points": kept} if kept else {}),
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
