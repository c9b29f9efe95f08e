"""Workers survive Redis restarts: a redis-server of the test's own is stopped and started again
under a supervised arq worker (service.jobs.worker.supervise), idle and busy."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from arq.worker import Worker
from jobtools import FakeRunner, RedisServer, make_job
from test_maintenance import RecordingQueue

from service.jobs import maintenance, worker
from service.jobs.maintenance import Housekeeper
from service.jobs.queue import ArqQueue
from service.jobs.records import JobRecord, JobStatus
from service.jobs.state_redis import RedisStateStore
from service.jobs.types import JobContext, JobResult
from service.settings import Settings
from service.specs import JobSpec
from service.storage import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"
    ),
]

OUTAGE_S = 5.0  # arq alone ends its worker about 3 s into an outage


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def settings(server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=server.url,
        redis_prefix="gltest",
        queue_name="gltest:queue",
        s3_endpoint=None,
    )


@pytest.fixture
def state(settings: Settings) -> Iterator[RedisStateStore]:
    assert settings.redis_url is not None
    store = RedisStateStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    yield store
    store.close()


class GatedRunner(FakeRunner):
    """Holds each run until `gate` is set, so that a job can be running while Redis goes away."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def __call__(self, spec: JobSpec, ctx: JobContext) -> JobResult:
        self.started.set()
        self.gate.wait(60.0)
        return super().__call__(spec, ctx)


@asynccontextmanager
async def supervised(
    settings: Settings, runner: FakeRunner
) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    arq_worker = worker.build_worker(settings, runner=runner, handle_signals=False, poll_delay=0.05)
    task = asyncio.create_task(worker.supervise(arq_worker))
    try:
        await until(lambda: "state" in arq_worker.ctx, 60.0, "the worker's startup")
        yield arq_worker, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close_worker(arq_worker)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for `predicate` (which may call Redis: errors count as 'not yet'); return when it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await asyncio.to_thread(predicate):
                return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def submit(settings: Settings, state: RedisStateStore) -> JobRecord:
    job = make_job(state, settings)
    queue = ArqQueue(settings, state)
    await queue.start()
    try:
        await queue.enqueue(job)
    finally:
        await queue.close()
    return job


def status_is(state: RedisStateStore, job: JobRecord, status: JobStatus) -> Callable[[], bool]:
    return lambda: state.get_job(None, job.id).status == status


def test_an_idle_worker_outlives_a_redis_crash_and_runs_new_jobs(
    server: RedisServer, settings: Settings, state: RedisStateStore
) -> None:
    async def scenario() -> None:
        async with supervised(settings, FakeRunner()) as (_, task):
            server.kill()  # a crash: the data is gone too
            await asyncio.sleep(OUTAGE_S)
            assert not task.done(), "the worker ended during the outage"
            server.start()
            back = time.monotonic()
            job = await submit(settings, state)
            done = await until(status_is(state, job, JobStatus.SUCCEEDED), 30.0, "the new job")
            assert done - back < 15.0
            assert not task.done()

    asyncio.run(scenario())


def test_a_busy_worker_keeps_its_job_and_picks_the_queue_back_up(
    server: RedisServer, settings: Settings, state: RedisStateStore
) -> None:
    runner = GatedRunner()

    async def scenario() -> JobRecord:
        async with supervised(settings, runner) as (_, task):
            running = await submit(settings, state)
            await until(runner.started.is_set, 30.0, "the first job to start")
            queued = await submit(settings, state)  # one job at a time: this one waits
            server.stop(save=True)  # a restart that keeps the data
            await asyncio.sleep(OUTAGE_S / 2)
            runner.gate.set()  # the running job ends while Redis is away: its outcome must wait
            await asyncio.sleep(OUTAGE_S / 2)
            assert not task.done(), "the worker ended during the outage"
            server.start()
            await until(status_is(state, running, JobStatus.SUCCEEDED), 30.0, "the running job's outcome")
            await until(status_is(state, queued, JobStatus.SUCCEEDED), 30.0, "the queued job")
            after = await submit(settings, state)
            await until(status_is(state, after, JobStatus.SUCCEEDED), 30.0, "a job submitted afterwards")
            assert not task.done()
        return running

    first = state.get_job(None, asyncio.run(scenario()).id)
    assert first.attempts == 1 and first.error is None  # kept, not lost and run again
    assert runner.calls == 3


def test_leases_that_expired_during_an_outage_are_left_to_their_workers(
    server: RedisServer, settings: Settings, state: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "LEASE_S", 2.0)
    job = make_job(state, settings)
    assert state.claim(job.id, "w-alive", lease_s=1.0) is not None

    async def scenario() -> None:
        housekeeper = Housekeeper(state, LocalStore(settings.data_dir / "artifacts"), RecordingQueue(), 0.1)
        housekeeper.start()
        try:
            server.stop(save=True)
            await asyncio.sleep(2.0)  # the lease expires while Redis is away
            server.start()
            await asyncio.sleep(0.5)  # the reaper has run since; the worker's next beat comes now
            assert state.heartbeat(job.id, "w-alive", 60.0).owned
            await asyncio.sleep(2.5)  # past the hold: the renewed lease is not expired anyway
        finally:
            await housekeeper.stop()

    asyncio.run(scenario())
    assert state.get_job(None, job.id).status == JobStatus.RUNNING
