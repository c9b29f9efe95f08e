"""One run of one job, as every worker does it: claim under a lease, call the runner, record.

Both the embedded worker process and the arq worker call `execute_job`; it calls the one runner.
While the runner works, a heartbeat thread renews the job's lease and watches for a cancel; the
runner polls `Stopper` between iterations. A worker that dies stops renewing, and the reaper
(service/jobs/maintenance.py) hands the job to another try. A run that ends while the state store
is unreachable (Redis restarting) keeps its lease beating and records its outcome once the store
is back, rather than losing the work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.exceptions
import urllib3.exceptions

from service.errors import GradleakError, NotFoundError
from service.federations.spec import FederationSpec
from service.generators.spec import GeneratorTrainingSpec
from service.jobs.records import RUNNABLE, JobError, JobProgress, JobRecord, JobStatus, error_code
from service.jobs.state import StateStore
from service.jobs.types import JobContext, JobResult, Progress
from service.settings import get_settings
from service.specs import JobSpec
from service.storage import ArtifactStore
from service.studies.spec import StudyPlan

log = logging.getLogger("gradleak.worker")

LEASE_S = 15.0  # a worker silent this long is presumed dead
HEARTBEAT_S = 1.0  # also how quickly a running job notices a cancel
SETUP_GRACE_S = 300.0  # beyond budget.time_limit_s, for building the model, scoring and writing artifacts
RECORD_PATIENCE_S = 600.0  # how long a finished run waits for an unreachable state store to record it
RECORD_RETRY_MAX_S = 5.0

# Failures worth another try: the network or a backing service hiccuped, not the job. (The artifact
# stores raise OSError for an unreachable S3 endpoint or a failing disk.)
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    urllib3.exceptions.HTTPError,
)

AnySpec = JobSpec | FederationSpec | StudyPlan | GeneratorTrainingSpec
# a job, federation, study or generator training spec; the runner dispatches on its type
Runner = Callable[[Any, JobContext], JobResult]

_SMALLER = "lower the batch size or the image size, or use a worker with more memory"


class StopReason(StrEnum):
    CANCEL = "cancel"  # the user cancelled the job
    SHUTDOWN = "shutdown"  # the worker is stopping; the job goes back to the queue
    LEASE_LOST = "lease_lost"  # the reaper gave the job to another try: this run no longer counts
    DEADLINE = "deadline"  # the run outlived its time limit plus the setup grace


class Outcome(StrEnum):
    SKIPPED = "skipped"  # the job was not waiting (cancelled, finished, running elsewhere)
    DEFERRED = "deferred"  # the tenant has its quota of running jobs: the job keeps waiting
    FINISHED = "finished"  # a final state was recorded
    RELEASED = "released"  # the job went back to waiting (interrupted) for another try
    LOST = "lost"  # the job was taken away from this worker mid-run


class Stopper:
    """The runner's `should_stop`: a thread-safe flag with the first reason given, and a deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: StopReason | None = None
        self.deadline: float | None = None

    def stop(self, reason: StopReason) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason

    @property
    def reason(self) -> StopReason | None:
        return self._reason

    def __call__(self) -> bool:
        if self._reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.stop(StopReason.DEADLINE)
        return self._reason is not None


@dataclass
class _Publisher:
    """Turns the runner's progress into the job's stored progress, tracking the best loss so far."""

    state: StateStore
    job_id: str
    worker_id: str
    best_loss: float | None = None

    def __call__(self, p: Progress) -> None:
        if p.loss is not None and (self.best_loss is None or p.loss < self.best_loss):
            self.best_loss = p.loss
        progress = JobProgress(
            stage=p.stage,
            iteration=p.iteration,
            total=p.total,
            loss=p.loss,
            best_loss=self.best_loss,
            elapsed_s=p.elapsed_s,
            restart=p.restart,
            message=p.message,
            updated_at=time.time(),
        )
        try:
            self.state.set_progress(self.job_id, self.worker_id, progress)
        except Exception as e:  # progress is best effort: it must never fail the run
            log.warning("job %s: could not publish progress: %s", self.job_id, type(e).__name__)


class _Heartbeat(threading.Thread):
    def __init__(self, state: StateStore, job_id: str, worker_id: str, stopper: Stopper) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.state, self.job_id, self.worker_id, self.stopper = state, job_id, worker_id, stopper
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            try:
                beat = self.state.heartbeat(self.job_id, self.worker_id, LEASE_S)
            except Exception as e:  # keep beating: a store that is back renews the lease in time
                log.warning("job %s: heartbeat failed: %s", self.job_id, type(e).__name__)
                continue
            if not beat.owned:
                self.stopper.stop(StopReason.LEASE_LOST)
            elif beat.cancel_requested:
                self.stopper.stop(StopReason.CANCEL)


def upload_resolver(state: StateStore, store: ArtifactStore, tenant: str) -> Callable[[str], bytes]:
    """The runner's `resolve` for service jobs: upload ids of this tenant only, never paths."""

    def resolve(ref: str) -> bytes:
        try:
            upload = state.get_upload(tenant, ref)
            return store.get_bytes(upload.key)
        except NotFoundError:
            raise NotFoundError(f"upload {ref!r} no longer exists (deleted, or past its retention)") from None

    return resolve


def job_prefix(job: JobRecord) -> str:
    return f"{job.tenant}/{_FOLDERS[job.kind]}/{job.id}"


_FOLDERS = {
    "job": "jobs",
    "federation": "federations",
    "study": "studies",
    "generator_training": "generator-trainings",
}


def record_spec(job: JobRecord) -> AnySpec:
    """The spec a stored record runs: a JobSpec, a FederationSpec, or a study's plan."""
    if job.kind == "study":
        return StudyPlan.model_validate_json(job.spec_json)
    if job.kind == "federation":
        return FederationSpec.model_validate_json(job.spec_json)
    if job.kind == "generator_training":
        return GeneratorTrainingSpec.model_validate_json(job.spec_json)
    return JobSpec.model_validate_json(job.spec_json)


def time_limit(spec: AnySpec) -> float | None:
    """The wall-clock limit of a run: an attack's budget, or a whole federation's or study's."""
    if isinstance(spec, StudyPlan):
        return spec.study.time_limit_s
    if isinstance(spec, FederationSpec | GeneratorTrainingSpec):
        return spec.time_limit_s
    return spec.budget.time_limit_s


def execute_job(
    job_id: str,
    *,
    state: StateStore,
    store: ArtifactStore,
    worker_id: str,
    runner: Runner | None = None,
    stopper: Stopper | None = None,
    device: str | None = None,
    lpips_weights_dir: str | None = None,
) -> Outcome:
    """Run job `job_id` if it is waiting and record its outcome.

    Transient failures (connections, timeouts) put the job back as interrupted while tries
    remain; errors in the job itself fail it with their message; a stop for shutdown puts it
    back. Nothing about the job's data is logged.
    """
    if _tenant_at_running_quota(state, job_id):
        return Outcome.DEFERRED
    job = state.claim(job_id, worker_id, LEASE_S)
    if job is None:
        return Outcome.SKIPPED
    if runner is None:
        from service.jobs.runner import run_job

        runner = run_job
    if job.kind == "study":
        # A study's run works through its points with this very function, then aggregates them.
        from service.studies.run import study_runner

        runner = study_runner(
            state=state,
            store=store,
            worker_id=worker_id,
            point_runner=runner,
            device=device,
            lpips_weights_dir=lpips_weights_dir,
        )
    if job.kind == "generator_training":
        # A training run stores its generator as the tenant's upload when it succeeds.
        from service.generators.job import training_runner

        runner = training_runner(state, store, job.tenant, get_settings().retention_hours * 3600.0)

    stopper = stopper or Stopper()
    spec = record_spec(job)
    limit = time_limit(spec)
    if limit is not None:
        stopper.deadline = time.monotonic() + limit + SETUP_GRACE_S
    ctx = JobContext(
        job_id=job.id,
        store=store,
        prefix=job_prefix(job),
        resolve=upload_resolver(state, store, job.tenant),
        progress=_Publisher(state, job.id, worker_id),
        should_stop=stopper,
        device=device,
        lpips_weights_dir=lpips_weights_dir,
        memory_limit_bytes=get_settings().worker_memory_bytes,
    )
    heartbeat = _Heartbeat(state, job.id, worker_id, stopper)
    heartbeat.start()
    log.info("job %s: started (try %d of %d) on %s", job.id, job.attempts, job.max_attempts, worker_id)
    try:
        return _run_and_record(job, spec, ctx, runner, state, worker_id, stopper)
    finally:
        heartbeat.done.set()
        heartbeat.join()


def _tenant_at_running_quota(state: StateStore, job_id: str) -> bool:
    """Whether the job's tenant already runs its quota of jobs (checked when a worker picks the
    job, so several workers picking at once may pass it by one each)."""
    try:
        job = state.get_job(None, job_id)
    except NotFoundError:
        return False
    limit = job.max_running_jobs
    return limit is not None and state.count_running_jobs(job.tenant) >= limit


def _run_and_record(
    job: JobRecord,
    spec: AnySpec,
    ctx: JobContext,
    runner: Runner,
    state: StateStore,
    worker_id: str,
    stopper: Stopper,
) -> Outcome:
    def fail(code: str, message: str, result: JobResult | None = None) -> Outcome:
        error = JobError(code=code, message=message)
        return _finish(state, job, worker_id, JobStatus.FAILED, error=error, result=result)

    started = time.monotonic()
    try:
        result = runner(spec, ctx)
    except GradleakError as e:
        return fail(error_code(e), str(e))
    except TRANSIENT_ERRORS as e:
        log.warning("job %s: transient failure %s; releasing it for another try", job.id, type(e).__name__)
        reason = JobError(code="transient", message=f"a temporary failure stopped the run: {str(e)[:300]}")
        return _release(state, job, worker_id, reason)
    except MemoryError:
        return fail("out_of_memory", "the run ran out of memory; " + _SMALLER)
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda's, recognised without importing torch
            return fail("out_of_memory", "the GPU ran out of memory; " + _SMALLER)
        log.exception("job %s: internal error in the runner", job.id)
        return fail(
            "internal",
            f"the run stopped on an internal error; the worker's log has the details under job {job.id}",
        )

    stopped = stopper.reason
    elapsed = time.monotonic() - started
    log.info("job %s: runner returned %s after %.1fs", job.id, result.status, elapsed)
    if stopped == StopReason.LEASE_LOST:
        return Outcome.LOST
    if result.status == "cancelled" and stopped == StopReason.SHUTDOWN:
        back = JobError(code="interrupted", message="the worker shut down during the run")
        return _release(state, job, worker_id, back)
    if result.status == "cancelled" and stopped == StopReason.DEADLINE:
        field = "budget.time_limit_s" if isinstance(spec, JobSpec) else "time_limit_s"
        message = (
            f"the run outlived its time limit ({time_limit(spec):g} s, {field}) plus "
            f"{SETUP_GRACE_S:g} s for setup and scoring; raise the time limit or ask for less work"
        )
        return fail("time_limit", message, result)
    status = JobStatus.CANCELLED if result.status == "cancelled" else JobStatus.SUCCEEDED
    return _finish(state, job, worker_id, status, result=result)


def _patiently(job_id: str, record: Callable[[], JobRecord | None]) -> JobRecord | None:
    """`record()`, tried again with backoff while the state store is unreachable."""
    deadline = time.monotonic() + RECORD_PATIENCE_S
    delay = 0.25
    while True:
        try:
            return record()
        except TRANSIENT_ERRORS as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "job %s: cannot record the outcome yet (%s); trying again in %.1fs",
                job_id,
                type(e).__name__,
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, RECORD_RETRY_MAX_S)


def _release(state: StateStore, job: JobRecord, worker_id: str, reason: JobError) -> Outcome:
    back = _patiently(job.id, lambda: state.release(job.id, worker_id, reason))
    if back is None:
        return Outcome.LOST
    log.info("job %s: released as %s", job.id, back.status.value)
    return Outcome.RELEASED if back.status in RUNNABLE else Outcome.FINISHED


def _finish(
    state: StateStore,
    job: JobRecord,
    worker_id: str,
    status: JobStatus,
    *,
    error: JobError | None = None,
    result: JobResult | None = None,
) -> Outcome:
    done = _patiently(
        job.id,
        lambda: state.finish(
            job.id,
            worker_id,
            status,
            error=error,
            manifest=None if result is None else result.manifest,
            artifacts=None if result is None else result.artifacts,
        ),
    )
    if done is None:
        return Outcome.LOST
    log.info("job %s: %s%s", job.id, status.value, "" if error is None else f" ({error.code})")
    return Outcome.FINISHED
