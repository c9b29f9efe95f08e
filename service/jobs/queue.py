"""How a job reaches a worker: the queue protocol and its production backend, arq on Redis.

The queue carries the job id only; everything else is in the state store, which is the truth:
a queue entry for a job that is no longer waiting is skipped by the worker. arq's payloads are
JSON (never pickle). Each enqueue gets its own arq job id (`<job id>:<try>:<random>`), so a job the
reaper takes from a dead worker can be queued again while arq still remembers the old entry.

arq keeps an entry in its queue set (and an in-progress key) until the run ends; a killed worker's
entry would stay for the arq function's whole timeout, hours. KEDA scales the workers on that set's
size, so the reaper removes such entries (`entries`, `discard`; see maintenance.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import Job
from arq.jobs import JobStatus as ArqJobStatus

from service.jobs.records import JobRecord
from service.jobs.state import StateStore
from service.settings import Settings

log = logging.getLogger("gradleak.queue")

ARQ_FUNCTION = "run_attack"
ARQ_FEDERATION = "run_federation"  # the same work function, with a federation's longer timeout
ARQ_STUDY = "run_study"  # the same again, with a study's timeout
ARQ_TRAINING = "run_generator_training"  # the same again, with a training run's timeout
ARQ_FUNCTIONS = {
    "job": ARQ_FUNCTION,
    "federation": ARQ_FEDERATION,
    "study": ARQ_STUDY,
    "generator_training": ARQ_TRAINING,
}
ABORT_WAIT_S = 10.0


@dataclass(frozen=True)
class QueueEntry:
    ref: str  # the arq job id: <job id>:<try>:<random>
    queued_at: float  # epoch seconds (for a deferred retry: when it becomes due)
    in_progress: bool  # a worker took it (and may since have died)

    @property
    def job_id(self) -> str:
        return self.ref.split(":", 1)[0]


class JobQueue(Protocol):
    async def start(self) -> None: ...

    async def enqueue(self, job: JobRecord) -> None:
        """Hand a waiting job to the workers (again, for a retry)."""
        ...

    async def cancel(self, job: JobRecord) -> None:
        """Speed up a cancel the state store already records (the worker also sees it there)."""
        ...

    async def ensure_queued(self, job: JobRecord) -> None:
        """Queue a job that has waited long, in case its queue entry was lost."""
        ...

    async def entries(self, before: float, limit: int) -> list[QueueEntry]:
        """The oldest queue entries due before `before` (epoch seconds); none for a queue kept in
        the state store."""
        ...

    async def discard(self, ref: str) -> None:
        """Remove a queue entry that no run will complete (its job ended, or its worker died)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def json_serializer(obj: Any) -> bytes:
    # arq stores results too; a failed job's result is an exception, which becomes its repr.
    return json.dumps(obj, default=repr).encode()


def json_deserializer(data: bytes) -> Any:
    return json.loads(data)


def redis_settings(settings: Settings) -> RedisSettings:
    if not settings.redis_url:
        raise ValueError("the arq queue needs GRADLEAK_REDIS_URL")
    return RedisSettings.from_dsn(settings.redis_url)


def queue_ref(job: JobRecord) -> str:
    # arq refuses an id it still remembers (its results are kept a while): a suffix keeps each new.
    return f"{job.id}:{job.attempts + 1}:{secrets.token_hex(3)}"


class ArqQueue:
    def __init__(self, settings: Settings, state: StateStore, pool: ArqRedis | None = None) -> None:
        self.settings, self.state = settings, state
        self._pool = pool
        self._owns_pool = pool is None
        self._aborts: set[asyncio.Task[None]] = set()

    @property
    def pool(self) -> ArqRedis:
        if self._pool is None:
            raise RuntimeError("the arq queue is not started")
        return self._pool

    async def start(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                redis_settings(self.settings),
                default_queue_name=self.settings.queue_name,
                job_serializer=json_serializer,
                job_deserializer=json_deserializer,
            )

    async def enqueue(self, job: JobRecord) -> None:
        ref = queue_ref(job)
        # arq drops a job nobody picked up before it expires; ours live as long as their retention.
        expires_s = max(60.0, job.expires_at - job.created_at)
        function = ARQ_FUNCTIONS[job.kind]
        await self.pool.enqueue_job(
            function, job.id, _job_id=ref, _queue_name=self.settings.queue_name, _expires=expires_s
        )
        await asyncio.to_thread(self.state.set_queue_ref, job.id, ref)

    async def cancel(self, job: JobRecord) -> None:
        if job.queue_ref is None:
            return
        arq_job = Job(
            job.queue_ref, self.pool, _queue_name=self.settings.queue_name, _deserializer=json_deserializer
        )
        # abort() waits for the job to end; the caller should not, so it runs in the background.
        task = asyncio.create_task(self._abort(arq_job))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, arq_job: Job) -> None:
        try:
            await arq_job.abort(timeout=ABORT_WAIT_S)
        except TimeoutError:
            log.info("arq job %s: abort still pending after %.0fs", arq_job.job_id, ABORT_WAIT_S)

    async def ensure_queued(self, job: JobRecord) -> None:
        if job.queue_ref is not None:
            arq_job = Job(job.queue_ref, self.pool, _queue_name=self.settings.queue_name)
            if await arq_job.status() in (
                ArqJobStatus.queued,
                ArqJobStatus.deferred,
                ArqJobStatus.in_progress,
            ):
                return
        log.warning("job %s: waiting without a queue entry; queueing it again", job.id)
        await self.enqueue(job)

    async def entries(self, before: float, limit: int) -> list[QueueEntry]:
        name = self.settings.queue_name
        raw = await self.pool.zrangebyscore(name, "-inf", before * 1000, start=0, num=limit, withscores=True)
        refs = [r.decode() if isinstance(r, bytes) else str(r) for r, _ in raw]
        async with self.pool.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.exists(in_progress_key_prefix + ref)
            running = await pipe.execute()
        return [
            QueueEntry(ref=ref, queued_at=score / 1000, in_progress=bool(busy))
            for ref, (_, score), busy in zip(refs, raw, running, strict=True)
        ]

    async def discard(self, ref: str) -> None:
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.zrem(self.settings.queue_name, ref)
            pipe.delete(in_progress_key_prefix + ref, job_key_prefix + ref, retry_key_prefix + ref)
            await pipe.execute()

    async def ping(self) -> None:
        await self.pool.ping()

    async def close(self) -> None:
        for task in list(self._aborts):
            task.cancel()
        if self._pool is not None and self._owns_pool:
            await self._pool.aclose()
        self._pool = None
