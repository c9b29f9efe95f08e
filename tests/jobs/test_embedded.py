"""The embedded default's queue: jobs wait in SQLite and run one at a time beside the API."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from jobtools import TINY_SPEC, FakeRunner, make_job

from service.jobs.embedded import EmbeddedQueue
from service.jobs.records import JobStatus
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings
from service.storage import LocalStore


class OverlapRunner(FakeRunner):
    """Counts how many runs are in flight at once."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self.active = self.max_active = 0

    def __call__(self, spec, ctx):  # type: ignore[no-untyped-def]
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return super().__call__(spec, ctx)
        finally:
            with self._lock:
                self.active -= 1


async def wait_status(state: SQLiteStateStore, job_id: str, statuses: set[JobStatus], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.get_job(None, job_id).status in statuses:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} is {state.get_job(None, job_id).status}, expected one of {statuses}")


@pytest.fixture
def sqlite_state(tmp_path: Path) -> SQLiteStateStore:
    return SQLiteStateStore(tmp_path / "data" / "gradleak.db")


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "data" / "artifacts")


def test_jobs_run_one_at_a_time_in_order(
    sqlite_state: SQLiteStateStore, store: LocalStore, settings: Settings
) -> None:
    runner = OverlapRunner(iterations=3, delay_s=0.01)
    jobs = [make_job(sqlite_state, settings) for _ in range(3)]

    async def scenario() -> None:
        queue = EmbeddedQueue(settings, sqlite_state, store, isolation="thread", runner=runner)
        await queue.start()
        await queue.enqueue(jobs[0])
        for job in jobs:
            await wait_status(sqlite_state, job.id, {JobStatus.SUCCEEDED}, 10)
        await queue.close()

    asyncio.run(scenario())
    assert runner.max_active == 1
    started = [sqlite_state.get_job(None, j.id).started_at or 0.0 for j in jobs]
    assert started == sorted(started)


def test_a_restart_resumes_the_interrupted_job(
    sqlite_state: SQLiteStateStore, store: LocalStore, settings: Settings
) -> None:
    slow = FakeRunner(iterations=400, delay_s=0.01)
    job = make_job(sqlite_state, settings)

    async def first_server() -> None:
        queue = EmbeddedQueue(settings, sqlite_state, store, isolation="thread", runner=slow)
        await queue.start()
        await queue.enqueue(job)
        await asyncio.to_thread(slow.started.wait, 5)
        await queue.close()

    asyncio.run(first_server())
    stopped = sqlite_state.get_job(None, job.id)
    assert stopped.status == JobStatus.INTERRUPTED and stopped.error is not None

    async def second_server() -> None:
        queue = EmbeddedQueue(settings, sqlite_state, store, isolation="thread", runner=FakeRunner())
        await queue.start()  # nothing is enqueued: the job is found in the store
        await wait_status(sqlite_state, job.id, {JobStatus.SUCCEEDED}, 10)
        await queue.close()

    asyncio.run(second_server())
    assert sqlite_state.get_job(None, job.id).attempts == 2


def test_a_custom_runner_needs_thread_isolation(
    sqlite_state: SQLiteStateStore, store: LocalStore, settings: Settings
) -> None:
    with pytest.raises(ValueError, match="isolation='thread'"):
        EmbeddedQueue(settings, sqlite_state, store, runner=FakeRunner())


def test_worker_process_killed_mid_job_is_retried_and_succeeds(
    sqlite_state: SQLiteStateStore, store: LocalStore, settings: Settings
) -> None:
    """The real runner in the worker process; SIGKILL the process mid-attack: the job runs again."""
    spec = {**TINY_SPEC, "budget": {"iterations": 400, "time_limit_s": 2}}
    job = make_job(sqlite_state, settings, spec=spec)

    async def scenario() -> None:
        queue = EmbeddedQueue(settings, sqlite_state, store)
        await queue.start()
        await queue.enqueue(job)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = sqlite_state.get_job(None, job.id)
            progress = current.progress
            if current.status.terminal or (
                progress is not None and progress.stage == "attack" and progress.iteration
            ):
                break
            await asyncio.sleep(0.05)
        assert current.status == JobStatus.RUNNING, f"the attack did not start: {current.error}"
        workers = [p for p in multiprocessing.active_children() if p.name == "gradleak-worker"]
        assert len(workers) == 1 and workers[0].pid is not None
        os.kill(workers[0].pid, signal.SIGKILL)
        await wait_status(sqlite_state, job.id, {JobStatus.SUCCEEDED, JobStatus.FAILED}, 90)
        await queue.close()

    asyncio.run(scenario())
    done = sqlite_state.get_job(None, job.id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.attempts == 2
    assert set(done.artifacts) == {"metrics.json", "grid.png", "reconstruction.safetensors", "report.html"}
