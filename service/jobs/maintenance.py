"""Housekeeping every API process and every worker runs: the reaper and the retention sweep.

The reaper finds running jobs whose lease expired (their worker was killed or lost its network)
and gives them another try, or fails them with the reason once their tries are used up; the dead
run's queue entry goes with it. It removes other queue entries no run will complete (their job
ended or is gone, or a dead worker held them), so the queue's size, which autoscaling reads, is
the true backlog, and re-queues jobs that have waited suspiciously long, in case their queue
entry was lost. The sweep
deletes uploads and finished jobs (records and artifacts) past their retention: uploads and
reconstructions are private data. The orphan sweep deletes stored objects that no record claims
(after Redis lost its data, say) once they are older than the retention period, when their
record would have expired too: the age keeps it from touching anything live, even against a
wrongly configured, empty state store. Several processes may run these at once; every step is a
compare-and-set in the state store, so each job is handled once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import NotFoundError
from service.jobs.execute import LEASE_S, TRANSIENT_ERRORS, job_prefix
from service.jobs.queue import JobQueue, QueueEntry
from service.jobs.records import RUNNABLE, JobError, JobRecord, JobStatus
from service.jobs.state import StateStore
from service.storage import ArtifactStore

log = logging.getLogger("gradleak.maintenance")

REAP_INTERVAL_S = 5.0
SWEEP_INTERVAL_S = 300.0
ORPHAN_SWEEP_INTERVAL_S = 3600.0  # it lists the whole store
STALE_WAIT_S = 300.0  # a waiting job untouched this long is checked against the queue
# A queue entry younger than this is left alone: its job may be between being queued and recording
# its queue reference, or a finished run may still be clearing it.
ENTRY_GRACE_S = 30.0
ENTRIES_PER_PASS = 500

_LOST_WORKER = JobError(code="worker_lost", message="the worker running this job stopped responding")


async def reap(
    state: StateStore, queue: JobQueue, now: float | None = None, *, release_leases: bool = True
) -> int:
    """Release running jobs with expired leases and queue them again; return how many.
    `release_leases=False` only checks the queue (see Housekeeper: right after a store outage)."""
    now = time.time() if now is None else now
    count = 0
    expired = await asyncio.to_thread(state.expired_leases, now) if release_leases else []
    for job in expired:
        released = await asyncio.to_thread(state.release, job.id, None, _LOST_WORKER)
        if released is None:
            continue  # another reaper got there first, or the worker came back
        count += 1
        log.warning(
            "job %s: worker %s stopped responding; job is now %s", job.id, job.worker_id, released.status
        )
        if job.queue_ref is not None:
            await queue.discard(job.queue_ref)
        if released.status in RUNNABLE:
            await queue.enqueue(released)
    await prune_queue(state, queue, now)
    for job in await asyncio.to_thread(state.runnable, 100):
        if now - job.updated_at > STALE_WAIT_S:
            await queue.ensure_queued(job)
    return count


async def prune_queue(state: StateStore, queue: JobQueue, now: float | None = None) -> int:
    """Remove the queue entries no run will complete; return how many."""
    now = time.time() if now is None else now
    removed = 0
    for entry in await queue.entries(now - ENTRY_GRACE_S, ENTRIES_PER_PASS):
        try:
            job: JobRecord | None = await asyncio.to_thread(state.get_job, None, entry.job_id)
        except NotFoundError:
            job = None
        if _stale(entry, job, now):
            await queue.discard(entry.ref)
            removed += 1
    if removed:
        log.info("queue: removed %d stale entries", removed)
    return removed


def _stale(entry: QueueEntry, job: JobRecord | None, now: float) -> bool:
    if job is None or job.status.terminal:
        return True  # a worker would only skip it
    current = entry.ref == job.queue_ref
    if job.status == JobStatus.RUNNING:
        return not current  # an older entry of a job that runs under its newest one
    # Waiting: an entry a worker took without starting the job is a dead worker's, if it is not the
    # job's newest entry or the job has not moved since long.
    return entry.in_progress and (not current or now - job.updated_at > STALE_WAIT_S)


def sweep(state: StateStore, store: ArtifactStore, now: float | None = None) -> tuple[int, int]:
    """Delete expired uploads and finished jobs with their artifacts: (jobs, uploads) deleted."""
    now = time.time() if now is None else now
    jobs = uploads = 0
    for job in state.expired_jobs(now):
        store.delete_prefix(job_prefix(job))
        state.delete_job(job.id)
        jobs += 1
    for upload in state.expired_uploads(now):
        store.delete_prefix(upload.key.rsplit("/", 1)[0])
        with contextlib.suppress(NotFoundError):  # deleted by its owner meanwhile
            state.delete_upload(upload.tenant, upload.id)
        uploads += 1
    if jobs or uploads:
        log.info("retention: deleted %d jobs and %d uploads", jobs, uploads)
    return jobs, uploads


def sweep_orphans(
    state: StateStore, store: ArtifactStore, older_than_s: float, now: float | None = None
) -> int:
    """Delete the uploads and job folders (`<tenant>/uploads/<id>/`, `<tenant>/jobs/<id>/`) that have
    no record and whose newest object is older than `older_than_s`; return how many folders."""
    now = time.time() if now is None else now
    newest: dict[tuple[str, str, str], float] = {}
    for key, modified in store.list_modified(""):
        parts = key.split("/")
        if len(parts) >= 4 and parts[1] in _RECORD_OF:
            folder = (parts[0], parts[1], parts[2])
            newest[folder] = max(newest.get(folder, 0.0), modified)
    deleted = 0
    for (tenant, kind, record_id), modified in sorted(newest.items()):
        if now - modified < older_than_s:
            continue
        try:
            _RECORD_OF[kind](state, tenant, record_id)
            continue
        except NotFoundError:
            pass
        store.delete_prefix(f"{tenant}/{kind}/{record_id}")
        deleted += 1
    if deleted:
        log.warning("orphan sweep: deleted %d stored folders that no record claims", deleted)
    return deleted


# How the orphan sweep finds the record of a folder: it raises NotFoundError when there is none.
_RECORD_OF: dict[str, Callable[[StateStore, str, str], object]] = {
    "uploads": lambda state, tenant, record_id: state.get_upload(tenant, record_id),
    "jobs": lambda state, tenant, record_id: state.get_job(tenant, record_id),
}


@dataclass
class Housekeeper:
    """Runs `reap`, `sweep` and (with `orphan_age_s`) `sweep_orphans` periodically in the
    background of an API process or a worker."""

    state: StateStore
    store: ArtifactStore
    queue: JobQueue
    reap_interval_s: float = REAP_INTERVAL_S
    sweep_interval_s: float = SWEEP_INTERVAL_S
    orphan_age_s: float | None = None  # the retention period
    orphan_interval_s: float = ORPHAN_SWEEP_INTERVAL_S

    def __post_init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="gradleak-housekeeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        last_sweep = last_orphan_sweep = 0.0
        # Leases expire while the store is down (a Redis restart) although their workers live on.
        # Once it is back, give them a lease's time to renew before taking their jobs away.
        hold_leases_until = 0.0
        while True:
            try:
                await reap(self.state, self.queue, release_leases=time.monotonic() >= hold_leases_until)
                if time.monotonic() - last_sweep >= self.sweep_interval_s:
                    await asyncio.to_thread(sweep, self.state, self.store)
                    last_sweep = time.monotonic()
                if (
                    self.orphan_age_s is not None
                    and time.monotonic() - last_orphan_sweep >= self.orphan_interval_s
                ):
                    await asyncio.to_thread(sweep_orphans, self.state, self.store, self.orphan_age_s)
                    last_orphan_sweep = time.monotonic()
            except asyncio.CancelledError:
                raise
            except TRANSIENT_ERRORS as e:
                hold_leases_until = time.monotonic() + LEASE_S
                log.warning(
                    "housekeeping: a store is unreachable (%s); trying again in %.0fs",
                    e,
                    self.reap_interval_s,
                )
            except Exception:  # a store hiccup must not end housekeeping for the process' lifetime
                log.exception("housekeeping failed; trying again in %.0fs", self.reap_interval_s)
            await asyncio.sleep(self.reap_interval_s)
