"""The embedded default's queue: jobs wait in SQLite and run one at a time beside the API."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from jobtools import TINY_SPEC, FakeRunner, make_job, wait_for

from service.jobs import embedded
from service.jobs.embedded import EmbeddedQueue
from service.jobs.records import JobProgress, JobStatus
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
    # long enough that a loaded machine's poller still sees the attack running before it ends
    spec = {**TINY_SPEC, "budget": {"iterations": 4000, "time_limit_s": 5}}
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


# An embedded server (its queue with a worker process) on a data directory, until it is killed.
SERVER = """
import asyncio, sys
from pathlib import Path
from service.jobs.embedded import EmbeddedQueue
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings
from service.storage import LocalStore

async def serve() -> None:
    settings = Settings(data_dir=Path(sys.argv[1]), redis_url=None, s3_endpoint=None)
    state = SQLiteStateStore(settings.data_dir / "gradleak.db")
    queue = EmbeddedQueue(settings, state, LocalStore(settings.data_dir / "artifacts"))
    await queue.start()
    await asyncio.sleep(3600)

asyncio.run(serve())
"""


def _iteration(progress: JobProgress | None) -> int:
    return 0 if progress is None else progress.iteration


def recorded_worker(data_dir: Path) -> psutil.Process:
    record = json.loads((data_dir / embedded.PID_FILE).read_text())
    return psutil.Process(record["worker"][0])


def test_the_worker_of_a_killed_server_stops(
    sqlite_state: SQLiteStateStore, settings: Settings, tmp_path: Path
) -> None:
    """`kill -9` of the server mid-attack: its worker process must not attack on beside the next one."""
    spec = {**TINY_SPEC, "budget": {"iterations": 1000, "time_limit_s": 600}}
    job = make_job(sqlite_state, settings, spec=spec)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(settings.data_dir)])
    try:
        wait_for(lambda: _iteration(sqlite_state.get_job(None, job.id).progress) > 0, 90.0, "the attack")
        worker = recorded_worker(settings.data_dir)
        assert worker.is_running()
    finally:
        server.kill()
        server.wait(10.0)
    try:
        worker.wait(5 * embedded.PARENT_CHECK_S)  # psutil.TimeoutExpired if it attacks on
    finally:
        if worker.is_running():
            worker.kill()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait(10.0)


@pytest.mark.parametrize("server_alive", [False, True])
def test_a_starting_server_kills_an_orphaned_worker_only(
    sqlite_state: SQLiteStateStore,
    store: LocalStore,
    settings: Settings,
    sleeper: subprocess.Popen[bytes],
    server_alive: bool,
) -> None:
    """The pid file: a recorded worker whose server is gone is killed; one whose server runs is not
    (another server on the same directory), nor a process that merely reuses the recorded pid."""
    worker = psutil.Process(sleeper.pid)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    server = (
        [os.getpid(), psutil.Process().create_time()] if server_alive else [int(gone.stdout), time.time()]
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    record = {"worker": [sleeper.pid, worker.create_time()], "server": server}
    (settings.data_dir / embedded.PID_FILE).write_text(json.dumps(record))

    async def start_and_close() -> None:
        queue = EmbeddedQueue(settings, sqlite_state, store)
        await queue.start()
        await queue.close()

    asyncio.run(start_and_close())
    assert worker.is_running() == server_alive
    if server_alive:  # and a process that only reuses the pid is not the recorded worker
        record["worker"][1] -= 1000
        record["server"] = [int(gone.stdout), time.time()]
        (settings.data_dir / embedded.PID_FILE).write_text(json.dumps(record))
        asyncio.run(start_and_close())
        assert worker.is_running()
