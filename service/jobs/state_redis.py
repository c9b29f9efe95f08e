"""Job state in Redis: production, shared by the API replicas and the arq workers.

Each record is one JSON string; sorted sets index them (per tenant, per status, by lease expiry
and by retention). A transition reads the record under WATCH and writes record and indexes in one
MULTI, retrying when another client changed the record in between, so the record and its indexes
never disagree. All keys start with the configured prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import WatchError

from service.errors import NotFoundError
from service.jobs.records import (
    JOB_PREFIX,
    RUNNABLE,
    TERMINAL,
    UPLOAD_PREFIXES,
    ApiKeyRecord,
    Heartbeat,
    JobError,
    JobProgress,
    JobRecord,
    JobStatus,
    UploadRecord,
)
from service.jobs.state import released_outcome

Transition = Callable[[JobRecord], JobRecord | None]


class RedisStateStore:
    def __init__(self, client: redis.Redis, prefix: str = "gradleak") -> None:
        # redis-py types the replies of its sync client as "value or awaitable"; Any spares a cast per call.
        self.r: Any = client
        self.p = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "gradleak") -> RedisStateStore:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=10.0,
            socket_connect_timeout=5.0,
            health_check_interval=30,
        )
        return cls(client, prefix)

    # --- key names ----------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _tenant_index(self, tenant: str, status: JobStatus | None = None) -> str:
        return f"{self.p}:jobs:{tenant}" if status is None else f"{self.p}:jobs:{tenant}:{status.value}"

    def _status_index(self, status: JobStatus) -> str:
        return f"{self.p}:status:{status.value}"

    def _idempotency(self, tenant: str, key: str) -> str:
        return f"{self.p}:idem:{tenant}:{key}"

    @property
    def _leases(self) -> str:
        return f"{self.p}:leases"

    @property
    def _job_expiry(self) -> str:
        return f"{self.p}:expiry:jobs"

    @property
    def _upload_expiry(self) -> str:
        return f"{self.p}:expiry:uploads"

    def _upload(self, upload_id: str) -> str:
        return f"{self.p}:upload:{upload_id}"

    def _upload_sizes(self, tenant: str) -> str:
        return f"{self.p}:uploadsizes:{tenant}"

    def _key(self, digest: str) -> str:
        return f"{self.p}:apikey:{digest}"

    @property
    def _key_ids(self) -> str:
        return f"{self.p}:apikeys"

    # --- API keys -----------------------------------------------------------------------------

    def add_key(self, key: ApiKeyRecord) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._key(key.digest), key.model_dump_json())
            pipe.hset(self._key_ids, key.id, key.digest)
            pipe.execute()

    def find_key(self, digest: str) -> ApiKeyRecord | None:
        raw = self.r.get(self._key(digest))
        return None if raw is None else ApiKeyRecord.model_validate_json(raw)

    def list_keys(self) -> list[ApiKeyRecord]:
        digests = self.r.hgetall(self._key_ids)
        if not digests:
            return []
        raws = self.r.mget([self._key(d) for d in digests.values()])
        return sorted((ApiKeyRecord.model_validate_json(r) for r in raws if r), key=lambda k: k.id)

    def revoke_key(self, key_id: str) -> ApiKeyRecord:
        digest = self.r.hget(self._key_ids, key_id)
        if digest is None:
            raise NotFoundError(f"no API key {key_id!r}")
        name = self._key(digest)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(name)
                    raw = pipe.get(name)
                    if raw is None:
                        raise NotFoundError(f"no API key {key_id!r}")
                    key = ApiKeyRecord.model_validate_json(raw)
                    if key.revoked_at is not None:
                        return key
                    key = key.model_copy(update={"revoked_at": time.time()})
                    pipe.multi()
                    pipe.set(name, key.model_dump_json())
                    pipe.execute()
                    return key
                except WatchError:
                    continue

    # --- uploads ------------------------------------------------------------------------------

    def add_upload(self, upload: UploadRecord) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._upload(upload.id), upload.model_dump_json())
            pipe.zadd(self._upload_expiry, {upload.id: upload.expires_at})
            pipe.zadd(self._upload_sizes(upload.tenant), {upload.id: upload.size})
            pipe.execute()

    def get_upload(self, tenant: str, upload_id: str) -> UploadRecord:
        raw = self.r.get(self._upload(upload_id))
        upload = None if raw is None else UploadRecord.model_validate_json(raw)
        if upload is None or upload.tenant != tenant:
            raise NotFoundError(f"no upload {upload_id!r}")
        return upload

    def delete_upload(self, tenant: str, upload_id: str) -> UploadRecord:
        upload = self.get_upload(tenant, upload_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._upload(upload_id))
            pipe.zrem(self._upload_expiry, upload_id)
            pipe.zrem(self._upload_sizes(tenant), upload_id)
            pipe.execute()
        return upload

    def list_uploads(self, tenant: str, kind: str, limit: int = 100) -> list[UploadRecord]:
        # the tenant's upload ids are the members of its size index; ids sort by creation time
        prefix = UPLOAD_PREFIXES.get(kind, kind) + "_"
        ids = sorted(
            (i for i in self.r.zrange(self._upload_sizes(tenant), 0, -1) if i.startswith(prefix)),
            reverse=True,
        )
        out: list[UploadRecord] = []
        for raw in self.r.mget([self._upload(i) for i in ids[:limit]]) if ids else []:
            if raw is not None:
                upload = UploadRecord.model_validate_json(raw)
                if upload.tenant == tenant and upload.kind == kind:
                    out.append(upload)
        return out

    def expired_uploads(self, now: float, limit: int = 100) -> list[UploadRecord]:
        ids = self.r.zrangebyscore(self._upload_expiry, "-inf", now, start=0, num=limit)
        if not ids:
            return []
        out = []
        for upload_id, raw in zip(ids, self.r.mget([self._upload(i) for i in ids]), strict=True):
            if raw is None:  # the record is gone; drop the stale index entry
                self.r.zrem(self._upload_expiry, upload_id)
            else:
                out.append(UploadRecord.model_validate_json(raw))
        return out

    # --- jobs: the API's side -----------------------------------------------------------------

    def create_job(self, job: JobRecord) -> tuple[JobRecord, bool]:
        with self.r.pipeline() as pipe:
            while True:
                try:
                    if job.idempotency_key is not None:
                        idem = self._idempotency(job.tenant, job.idempotency_key)
                        pipe.watch(idem)
                        existing_id = pipe.get(idem)
                        if existing_id is not None:
                            raw = pipe.get(self._job(existing_id))
                            pipe.unwatch()
                            if raw is not None:
                                return JobRecord.model_validate_json(raw), False
                            pipe.watch(idem)  # the old job expired: the key is free again
                    pipe.multi()
                    if job.idempotency_key is not None:
                        ttl = max(1, int(job.expires_at - time.time()))
                        pipe.set(self._idempotency(job.tenant, job.idempotency_key), job.id, ex=ttl)
                    pipe.set(self._job(job.id), job.model_dump_json())
                    pipe.zadd(self._tenant_index(job.tenant), {job.id: 0})
                    pipe.zadd(self._job_expiry, {job.id: job.expires_at})
                    self._index_status(pipe, None, job)
                    pipe.execute()
                    return job, True
                except WatchError:
                    continue

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord:
        raw = self.r.get(self._job(job_id))
        job = None if raw is None else JobRecord.model_validate_json(raw)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def list_jobs(
        self,
        tenant: str,
        status: JobStatus | None = None,
        limit: int = 50,
        before: str | None = None,
        kind: str = JOB_PREFIX,
    ) -> list[JobRecord]:
        index = self._tenant_index(tenant, status)
        # ids are "<kind>_<hex>": "_" sorts right before "`", so these bounds hold one kind
        top = f"({before}" if before else f"({kind}`"
        ids = self.r.zrevrangebylex(index, top, f"({kind}_", start=0, num=limit)
        return self._load(ids)

    def request_cancel(self, tenant: str, job_id: str) -> JobRecord:
        def cancel(job: JobRecord) -> JobRecord | None:
            now = time.time()
            if job.status in RUNNABLE:
                return job.model_copy(
                    update={
                        "status": JobStatus.CANCELLED,
                        "cancel_requested": True,
                        "finished_at": now,
                        "updated_at": now,
                    }
                )
            if job.status == JobStatus.RUNNING and not job.cancel_requested:
                return job.model_copy(update={"cancel_requested": True, "updated_at": now})
            return None

        self.get_job(tenant, job_id)
        job, _ = self._transition(job_id, cancel)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def set_queue_ref(self, job_id: str, ref: str) -> None:
        self._transition(job_id, lambda job: job.model_copy(update={"queue_ref": ref}))

    # --- jobs: the workers' side --------------------------------------------------------------

    def runnable(self, limit: int = 100) -> list[JobRecord]:
        ids: list[str] = []
        for status in (JobStatus.QUEUED, JobStatus.INTERRUPTED):
            ids += self.r.zrangebylex(self._status_index(status), "-", "+", start=0, num=limit)
        return self._load(sorted(ids)[:limit])

    def claim(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        def start(job: JobRecord) -> JobRecord | None:
            if job.status not in RUNNABLE or job.attempts >= job.max_attempts:
                return None
            now = time.time()
            return job.model_copy(
                update={
                    "status": JobStatus.RUNNING,
                    "attempts": job.attempts + 1,
                    "worker_id": worker_id,
                    "lease_expires_at": now + lease_s,
                    "started_at": now,
                    "updated_at": now,
                    "progress": None,
                    "error": None,
                }
            )

        job, changed = self._transition(job_id, start)
        return job if changed else None

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> Heartbeat:
        def renew(job: JobRecord) -> JobRecord | None:
            if job.status != JobStatus.RUNNING or job.worker_id != worker_id:
                return None
            return job.model_copy(update={"lease_expires_at": time.time() + lease_s})

        job, changed = self._transition(job_id, renew)
        return Heartbeat(owned=changed, cancel_requested=job is not None and changed and job.cancel_requested)

    def set_progress(self, job_id: str, worker_id: str, progress: JobProgress) -> bool:
        def report(job: JobRecord) -> JobRecord | None:
            if job.status != JobStatus.RUNNING or job.worker_id != worker_id:
                return None
            return job.model_copy(update={"progress": progress, "updated_at": time.time()})

        _, changed = self._transition(job_id, report)
        return changed

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
        if status not in TERMINAL:
            raise ValueError(f"finish needs a final status, got {status}")

        def end(job: JobRecord) -> JobRecord | None:
            if job.status != JobStatus.RUNNING or job.worker_id != worker_id:
                return None
            now = time.time()
            return job.model_copy(
                update={
                    "status": status,
                    "error": error,
                    "manifest": manifest,
                    "artifacts": artifacts or {},
                    "finished_at": now,
                    "updated_at": now,
                    "lease_expires_at": None,
                }
            )

        job, changed = self._transition(job_id, end)
        return job if changed else None

    def release(self, job_id: str, worker_id: str | None, error: JobError) -> JobRecord | None:
        def give_back(job: JobRecord) -> JobRecord | None:
            now = time.time()
            if job.status != JobStatus.RUNNING:
                return None
            if worker_id is not None and job.worker_id != worker_id:
                return None
            if worker_id is None and (job.lease_expires_at or 0.0) > now:
                return None
            status, reason = released_outcome(job, error)
            return job.model_copy(
                update={
                    "status": status,
                    "error": reason,
                    "worker_id": None,
                    "lease_expires_at": None,
                    "finished_at": None if status in RUNNABLE else now,
                    "updated_at": now,
                }
            )

        job, changed = self._transition(job_id, give_back)
        return job if changed else None

    def expired_leases(self, now: float) -> list[JobRecord]:
        ids = self.r.zrangebyscore(self._leases, "-inf", f"({now}")
        return [j for j in self._load(ids) if j.status == JobStatus.RUNNING]

    # --- retention and metrics ----------------------------------------------------------------

    def expired_jobs(self, now: float, limit: int = 100) -> list[JobRecord]:
        ids = self.r.zrangebyscore(self._job_expiry, "-inf", now, start=0, num=limit)
        return [j for j in self._load(ids) if j.status in TERMINAL]

    def delete_job(self, job_id: str) -> None:
        raw = self.r.get(self._job(job_id))
        if raw is None:
            return
        job = JobRecord.model_validate_json(raw)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._job(job_id))
            pipe.zrem(self._tenant_index(job.tenant), job_id)
            pipe.zrem(self._job_expiry, job_id)
            pipe.zrem(self._leases, job_id)
            for status in JobStatus:
                pipe.zrem(self._tenant_index(job.tenant, status), job_id)
                pipe.zrem(self._status_index(status), job_id)
            if job.idempotency_key is not None:
                pipe.delete(self._idempotency(job.tenant, job.idempotency_key))
            pipe.execute()

    def count_by_status(self) -> dict[JobStatus, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for status in JobStatus:
                pipe.zcard(self._status_index(status))
            counts = pipe.execute()
        return dict(zip(JobStatus, counts, strict=True))

    # --- quotas -------------------------------------------------------------------------------

    def count_running_jobs(self, tenant: str) -> int:
        return int(self.r.zcard(self._tenant_index(tenant, JobStatus.RUNNING)))

    def count_waiting_jobs(self, tenant: str) -> int:
        with self.r.pipeline(transaction=False) as pipe:
            for status in RUNNABLE:
                pipe.zcard(self._tenant_index(tenant, status))
            return int(sum(pipe.execute()))

    def stored_bytes(self, tenant: str) -> int:
        # a set of (upload id, size): adding or removing an upload twice counts it once
        return int(sum(size for _, size in self.r.zrange(self._upload_sizes(tenant), 0, -1, withscores=True)))

    def ping(self) -> None:
        self.r.ping()

    def close(self) -> None:
        self.r.close()

    # --- internals ----------------------------------------------------------------------------

    def _load(self, ids: list[str]) -> list[JobRecord]:
        if not ids:
            return []
        raws = self.r.mget([self._job(i) for i in ids])
        return [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]

    def _index_status(self, pipe: redis.client.Pipeline, old: JobRecord | None, new: JobRecord) -> None:
        if old is not None and old.status != new.status:
            pipe.zrem(self._status_index(old.status), new.id)
            pipe.zrem(self._tenant_index(new.tenant, old.status), new.id)
        if old is None or old.status != new.status:
            pipe.zadd(self._status_index(new.status), {new.id: 0})
            pipe.zadd(self._tenant_index(new.tenant, new.status), {new.id: 0})
        if new.status == JobStatus.RUNNING and new.lease_expires_at is not None:
            pipe.zadd(self._leases, {new.id: new.lease_expires_at})
        elif old is not None and old.status == JobStatus.RUNNING:
            pipe.zrem(self._leases, new.id)

    def _transition(self, job_id: str, change: Transition) -> tuple[JobRecord | None, bool]:
        """Apply `change` to the stored job atomically: (the job as stored now, or None when it does
        not exist, e.g. deleted by retention mid-run; whether it changed)."""
        name = self._job(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(name)
                    raw = pipe.get(name)
                    if raw is None:
                        pipe.unwatch()
                        return None, False
                    old = JobRecord.model_validate_json(raw)
                    new = change(old)
                    if new is None:
                        pipe.unwatch()
                        return old, False
                    pipe.multi()
                    pipe.set(name, new.model_dump_json())
                    self._index_status(pipe, old, new)
                    pipe.execute()
                    return new, True
                except WatchError:
                    continue
