"""A study's run: work through its points with the one `execute_job`, then aggregate them.

Each point is an ordinary job or federation record made when the study was submitted and queued
like any other, so every worker shares a study's points; the worker that runs the study record
also takes waiting points itself (a claim is a compare-and-set, so each point runs once) and waits
for those running elsewhere. Finished points are never redone: after a crash the study's next try
sees them finished and goes on with the rest. When every point has finished, the study writes
its table, plots and report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.jobs.execute import Runner, Stopper, StopReason, execute_job
from service.jobs.records import RUNNABLE, JobRecord
from service.jobs.state import StateStore
from service.jobs.types import JobContext, JobResult, Progress
from service.settings import get_settings
from service.storage import ArtifactStore
from service.studies.batch import batchable, run_batch
from service.studies.spec import StudyPlan

log = logging.getLogger("gradleak.studies")

POLL_S = 0.5  # how often a study looks at points that run on other workers


class _PointStopper(Stopper):
    """A point's stopper that also stops when its study stops, for the same reason."""

    def __init__(self, study: Callable[[], bool]) -> None:
        super().__init__()
        self.study = study

    def __call__(self) -> bool:
        if self.study():
            self.stop(getattr(self.study, "reason", None) or StopReason.SHUTDOWN)
        return super().__call__()


def progress_of(plan: StudyPlan, records: list[JobRecord], elapsed_s: float) -> Progress:
    """Points done of total, and an ETA from the study's throughput so far (any number of workers)."""
    total = len(plan.points)
    done = sum(r.status.terminal for r in records)
    running = sum(r.status.value == "running" for r in records)
    eta = elapsed_s / done * (total - done) if done else None
    eta_text = "" if eta is None or done == total else f", ETA {eta:.0f} s"
    return Progress(
        stage="done" if done == total else "attack",
        iteration=done,
        total=total,
        elapsed_s=elapsed_s,
        message=f"{done}/{total} points done, {running} running{eta_text}",
    )


def study_runner(
    *,
    state: StateStore,
    store: ArtifactStore,
    worker_id: str,
    point_runner: Runner,
    device: str | None,
    lpips_weights_dir: str | None,
) -> Runner:
    def run(plan: object, ctx: JobContext) -> JobResult:
        assert isinstance(plan, StudyPlan)
        return run_study(
            plan,
            ctx,
            state=state,
            worker_id=worker_id,
            point_runner=point_runner,
            device=device,
            lpips_weights_dir=lpips_weights_dir,
        )

    return run


def point_records(state: StateStore, plan: StudyPlan) -> list[JobRecord]:
    return [state.get_job(None, p.id) for p in plan.points]


def run_study(
    plan: StudyPlan,
    ctx: JobContext,
    *,
    state: StateStore,
    worker_id: str,
    point_runner: Runner,
    device: str | None = None,
    lpips_weights_dir: str | None = None,
) -> JobResult:
    started = time.monotonic()
    should_stop = ctx.should_stop or (lambda: False)
    ran_here = 0
    while True:
        records = point_records(state, plan)
        if ctx.progress is not None:
            ctx.progress(progress_of(plan, records, time.monotonic() - started))
        if all(r.status.terminal for r in records) or should_stop():
            break
        waiting = [r for r in records if r.status in RUNNABLE]
        if not waiting:
            time.sleep(POLL_S)  # the rest run on other workers
            continue
        group = batchable(waiting, plan.study.batch_points, get_settings().worker_memory_bytes)
        if len(group) > 1:
            run_batch(
                group,
                state=state,
                store=ctx.store,
                worker_ids=[f"{worker_id}:{ran_here + i}" for i in range(len(group))],
                point_runner=point_runner,
                stopper=lambda: _PointStopper(should_stop),
                device=device,
                lpips_weights_dir=lpips_weights_dir,
            )
            ran_here += len(group)
            continue
        execute_job(
            waiting[0].id,
            state=state,
            store=ctx.store,
            worker_id=f"{worker_id}:{ran_here}",
            runner=point_runner,
            stopper=_PointStopper(should_stop),
            device=device,
            lpips_weights_dir=lpips_weights_dir,
        )
        ran_here += 1

    reason = getattr(should_stop, "reason", None)
    if reason in (StopReason.SHUTDOWN, StopReason.LEASE_LOST):
        # the study goes back to the queue (or is another try's now): its outputs come later
        return JobResult(status="cancelled", manifest={"kind": "study", "status": "interrupted"})
    if reason == StopReason.CANCEL:
        for r in records:
            if not r.status.terminal:
                state.request_cancel(r.tenant, r.id)
        records = point_records(state, plan)
    from service.studies.outputs import write_outputs

    finished = reason is None and all(r.status.terminal for r in records)
    manifest, artifacts = write_outputs(plan, records, ctx, elapsed_s=time.monotonic() - started)
    manifest["ran_here"] = ran_here
    log.info("study %s: %d points, %d run by this worker", ctx.job_id, len(records), ran_here)
    return JobResult(status="succeeded" if finished else "cancelled", manifest=manifest, artifacts=artifacts)
