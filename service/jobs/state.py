"""The job state store: jobs, uploads and API keys, in SQLite (embedded) or Redis (production).

State never lives only in memory: an API restart or a dead worker loses no job. Every transition
a worker or the API makes is a compare-and-set on the stored record, so two workers, a reaper and
a user's cancel can race without corrupting a job. Both stores pass the same tests.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from service.jobs.records import (
    JOB_PREFIX,
    ApiKeyRecord,
    Heartbeat,
    JobError,
    JobProgress,
    JobRecord,
    JobStatus,
    UploadRecord,
)
from service.settings import Settings


@runtime_checkable
class StateStore(Protocol):
    # --- API keys -----------------------------------------------------------------------------
    def add_key(self, key: ApiKeyRecord) -> None: ...

    def find_key(self, digest: str) -> ApiKeyRecord | None:
        """The key with this sha256 digest, revoked or not; None when there is none."""
        ...

    def list_keys(self) -> list[ApiKeyRecord]: ...

    def revoke_key(self, key_id: str) -> ApiKeyRecord:
        """Mark a key revoked (idempotent); NotFoundError when there is no such key."""
        ...

    # --- uploads ------------------------------------------------------------------------------
    def add_upload(self, upload: UploadRecord) -> None: ...

    def get_upload(self, tenant: str, upload_id: str) -> UploadRecord:
        """NotFoundError when the upload does not exist or belongs to another tenant."""
        ...

    def delete_upload(self, tenant: str, upload_id: str) -> UploadRecord: ...

    def expired_uploads(self, now: float, limit: int = 100) -> list[UploadRecord]: ...

    def list_uploads(self, tenant: str, kind: str, limit: int = 100) -> list[UploadRecord]:
        """The tenant's uploads of one kind, newest first, at most `limit`."""
        ...

    # --- jobs: the API's side -----------------------------------------------------------------
    def create_job(self, job: JobRecord) -> tuple[JobRecord, bool]:
        """Store a new job; with an idempotency key already used by the tenant, return that
        job instead. The flag says whether the job was created."""
        ...

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord:
        """NotFoundError when the job does not exist or (tenant given) belongs to another tenant."""
        ...

    def list_jobs(
        self,
        tenant: str,
        status: JobStatus | None = None,
        limit: int = 50,
        before: str | None = None,
        kind: str = JOB_PREFIX,
    ) -> list[JobRecord]:
        """Newest first; `before` is the id of the last job of the previous page; `kind` is the id
        prefix of the records listed (jobs, or federations)."""
        ...

    def request_cancel(self, tenant: str, job_id: str) -> JobRecord:
        """A waiting job is cancelled at once; a running one is flagged and its worker stops it.
        A finished job is returned unchanged."""
        ...

    def set_queue_ref(self, job_id: str, ref: str) -> None: ...

    # --- jobs: the workers' side --------------------------------------------------------------
    def runnable(self, limit: int = 100) -> list[JobRecord]:
        """Queued and interrupted jobs, oldest first."""
        ...

    def claim(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        """Start a waiting job under a lease; None when it is not waiting (cancelled, running
        elsewhere, finished) or its tries are used up."""
        ...

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> Heartbeat: ...

    def set_progress(self, job_id: str, worker_id: str, progress: JobProgress) -> bool: ...

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        error: JobError | None = None,
        manifest: dict | None = None,
        artifacts: dict[str, str] | None = None,
    ) -> JobRecord | None:
        """Record the outcome of a run this worker owns; None when it no longer owns the job."""
        ...

    def release(self, job_id: str, worker_id: str | None, error: JobError) -> JobRecord | None:
        """Give a running job back: `interrupted` while tries remain, else `failed` with `error`
        (`cancelled` when a cancel was requested). With worker_id None (the reaper) only a job
        whose lease has expired is released. None when nothing changed."""
        ...

    def expired_leases(self, now: float) -> list[JobRecord]: ...

    # --- retention and metrics ----------------------------------------------------------------
    def expired_jobs(self, now: float, limit: int = 100) -> list[JobRecord]:
        """Finished jobs past their retention."""
        ...

    def delete_job(self, job_id: str) -> None: ...

    def count_by_status(self) -> dict[JobStatus, int]: ...

    # --- quotas -------------------------------------------------------------------------------
    def count_running_jobs(self, tenant: str) -> int: ...

    def count_waiting_jobs(self, tenant: str) -> int:
        """The tenant's queued and interrupted jobs."""
        ...

    def stored_bytes(self, tenant: str) -> int:
        """The total size of the tenant's uploads."""
        ...

    def ping(self) -> None:
        """Raise if the store is unreachable."""
        ...

    def close(self) -> None: ...


def open_state_store(settings: Settings) -> StateStore:
    """Redis when GRADLEAK_REDIS_URL is set, else SQLite under the data directory."""
    if settings.redis_url:
        from service.jobs.state_redis import RedisStateStore

        return RedisStateStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    from service.jobs.state_sqlite import SQLiteStateStore

    return SQLiteStateStore(settings.data_dir / "gradleak.db")


def released_outcome(job: JobRecord, error: JobError) -> tuple[JobStatus, JobError]:
    """Where a running job goes when its worker gives it back or is found dead."""
    if job.cancel_requested:
        return JobStatus.CANCELLED, error
    if job.attempts >= job.max_attempts:
        return JobStatus.FAILED, JobError(
            code=error.code,
            message=f"{error.message}; gave up after {job.attempts} tries. A job that keeps stopping its "
            "worker may need a smaller batch, fewer iterations or a machine with more memory",
        )
    return JobStatus.INTERRUPTED, error
