"""The production queue: arq on a real Redis, with stand-in runners."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from jobtools import REDIS_URL, FakeRunner, make_job, redis_client, wait_for

from service.federations.spec import FederationSpec
from service.jobs import execute, maintenance, worker
from service.jobs.queue import ArqQueue
from service.jobs.records import JobStatus
from service.jobs.state_redis import RedisStateStore
from service.jobs.submit import new_job
from service.jobs.types import JobContext, JobResult
from service.settings import Settings
from service.specs import JobSpec

pytestmark = pytest.mark.integration


@pytest.fixture
def state(arq_settings: Settings) -> Iterator[RedisStateStore]:
    store = RedisStateStore.from_url(REDIS_URL, prefix=arq_settings.redis_prefix)
    yield store
    store.close()


async def run_worker_until(
    settings: Settings,
    runner: Callable[[JobSpec, JobContext], JobResult],
    done: Callable[[], bool],
    timeout: float,
) -> None:
    arq_worker = worker.build_worker(settings, runner=runner, handle_signals=False, poll_delay=0.05)
    task = asyncio.create_task(arq_worker.async_run())
    try:
        for _ in range(int(timeout / 0.05)):
            if done() or task.done():
                break
            await asyncio.sleep(0.05)
    finally:
        await arq_worker.close()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def status_of(state: RedisStateStore, job_id: str) -> JobStatus:
    return state.get_job(None, job_id).status


def test_the_queued_payload_is_json_with_the_job_id_only(
    arq_settings: Settings, state: RedisStateStore
) -> None:
    job = make_job(state, arq_settings)

    async def scenario() -> str:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(job)
        await queue.close()
        ref = state.get_job(None, job.id).queue_ref
        assert ref is not None and ref.startswith(job.id + ":1:")
        return ref

    ref = asyncio.run(scenario())
    raw: Any = redis.Redis.from_url(REDIS_URL).get(f"arq:job:{ref}")
    assert raw is not None
    payload = json.loads(raw)  # JSON, not pickle
    assert payload["f"] == "run_attack" and payload["a"] == [job.id] and payload["k"] == {}


def test_a_worker_runs_the_job(arq_settings: Settings, state: RedisStateStore) -> None:
    job = make_job(state, arq_settings)

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(job)
        await queue.close()
        await run_worker_until(
            arq_settings, FakeRunner(), lambda: status_of(state, job.id) == JobStatus.SUCCEEDED, 30
        )

    asyncio.run(scenario())
    done = state.get_job(None, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.manifest is not None
    assert done.progress is not None and done.progress.iteration == 3


def test_a_federation_goes_to_its_own_arq_function_and_reaches_the_runner(
    arq_settings: Settings, state: RedisStateStore
) -> None:
    spec = FederationSpec(model={"arch": "mlp"}, rounds=2)  # type: ignore[arg-type]
    fed, _ = state.create_job(new_job(spec, "acme", arq_settings))
    seen: list[object] = []

    def runner(got: object, ctx: JobContext) -> JobResult:
        seen.append(got)
        return FakeRunner()(got, ctx)  # type: ignore[arg-type]

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(fed)
        await queue.close()
        await run_worker_until(
            arq_settings, runner, lambda: status_of(state, fed.id) == JobStatus.SUCCEEDED, 30
        )

    asyncio.run(scenario())
    ref = state.get_job(None, fed.id).queue_ref
    assert fed.id.startswith("fed_") and seen == [spec]
    raw: Any = redis.Redis.from_url(REDIS_URL).get(f"arq:result:{ref}")
    assert raw is None or json.loads(raw)["f"] == "run_federation"


def test_a_generator_training_run_goes_to_its_own_arq_function_and_registers_its_generator(
    arq_settings: Settings, state: RedisStateStore
) -> None:
    from service.generators.job import generator_upload_id
    from service.generators.spec import GeneratorTrainingSpec

    spec = GeneratorTrainingSpec.model_validate({"steps": 2, "batch_size": 4, "width": 4, "latent_dim": 8})
    run, _ = state.create_job(new_job(spec, "acme", arq_settings))

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(run)
        await queue.close()
        await run_worker_until(arq_settings, FakeRunner(), lambda: status_of(state, run.id).terminal, 60)

    asyncio.run(scenario())
    done = state.get_job(None, run.id)
    assert run.id.startswith("gtr_") and done.status == JobStatus.SUCCEEDED, done.error
    assert state.get_upload("acme", generator_upload_id(run.id)).kind == "generator"
    raw: Any = redis.Redis.from_url(REDIS_URL).get(f"arq:result:{done.queue_ref}")
    assert raw is None or json.loads(raw)["f"] == "run_generator_training"


class FlakyRunner(FakeRunner):
    """Fails its first run with a connection error, as when Redis or S3 blips."""

    def __call__(self, spec: JobSpec, ctx: JobContext) -> JobResult:
        self.error = redis.exceptions.ConnectionError("connection reset") if self.calls == 0 else None
        return super().__call__(spec, ctx)


def test_a_transient_failure_is_retried(
    arq_settings: Settings, state: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "RETRY_DELAY_S", 0.05)
    job = make_job(state, arq_settings)
    runner = FlakyRunner()

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(job)
        await queue.close()
        await run_worker_until(
            arq_settings, runner, lambda: status_of(state, job.id) == JobStatus.SUCCEEDED, 30
        )

    asyncio.run(scenario())
    done = state.get_job(None, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2 and runner.calls == 2


def test_an_arq_abort_cancels_the_running_job(
    arq_settings: Settings, state: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a slow heartbeat, only arq's abort can stop the run in time.
    monkeypatch.setattr(execute, "HEARTBEAT_S", 60.0)
    job = make_job(state, arq_settings)
    runner = FakeRunner(iterations=3000, delay_s=0.01)

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(job)

        def cancel_when_running() -> bool:
            current = state.get_job(None, job.id)
            if (
                current.status == JobStatus.RUNNING
                and current.progress is not None
                and not current.cancel_requested
            ):
                flagged = state.request_cancel("acme", job.id)
                asyncio.get_running_loop().create_task(queue.cancel(flagged))
            return current.status.terminal

        await run_worker_until(arq_settings, runner, cancel_when_running, 30)
        await queue.close()

    asyncio.run(scenario())
    cancelled = state.get_job(None, job.id)
    assert cancelled.status == JobStatus.CANCELLED
    assert cancelled.progress is not None and cancelled.progress.iteration < 3000


def test_a_worker_shutting_down_mid_job_hands_it_to_the_next(
    arq_settings: Settings, state: RedisStateStore
) -> None:
    job = make_job(state, arq_settings)

    def started() -> bool:
        return state.get_job(None, job.id).progress is not None

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(job)
        await queue.close()
        # Closing the worker cancels its running job, as SIGTERM does.
        await run_worker_until(arq_settings, FakeRunner(iterations=3000, delay_s=0.01), started, 30)
        interrupted = state.get_job(None, job.id)
        assert interrupted.status == JobStatus.INTERRUPTED, interrupted
        await run_worker_until(arq_settings, FakeRunner(), lambda: status_of(state, job.id).terminal, 30)

    asyncio.run(scenario())
    done = state.get_job(None, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2


# A worker process whose every run hangs, so that the test can kill it mid-job (with a short lease,
# so that the test need not wait long for it to run out).
HANGING_WORKER = """
import asyncio, time
from service.jobs import execute, worker
from service.settings import Settings

execute.LEASE_S = 1.0
worker._warm_up = lambda: None  # no engine to import for a run that only hangs

def hang(spec, ctx):
    time.sleep(3600)

arq_worker = worker.build_worker(Settings(), runner=hang, poll_delay=0.05)
asyncio.get_event_loop().run_until_complete(worker.supervise(arq_worker))
"""


def queued_refs(settings: Settings) -> list[str]:
    client = redis_client()
    assert client is not None
    try:
        return list(client.zrange(settings.queue_name, 0, -1))
    finally:
        client.close()


def test_a_killed_workers_queue_entry_goes_with_its_lease(
    arq_settings: Settings, state: RedisStateStore, tmp_path: Path
) -> None:
    job = make_job(state, arq_settings)

    async def enqueue() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await queue.enqueue(job)
        await queue.close()

    asyncio.run(enqueue())
    env = {
        **os.environ,
        "GRADLEAK_REDIS_URL": REDIS_URL,
        "GRADLEAK_REDIS_PREFIX": arq_settings.redis_prefix,
        "GRADLEAK_QUEUE_NAME": arq_settings.queue_name,
        "GRADLEAK_DATA_DIR": str(tmp_path / "worker"),
    }
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WORKER], env=env)
    try:
        wait_for(lambda: status_of(state, job.id) == JobStatus.RUNNING, 120.0, "the worker to take the job")
    finally:
        proc.kill()
        proc.wait(10.0)
    dead_ref = state.get_job(None, job.id).queue_ref
    assert queued_refs(arq_settings) == [dead_ref]  # arq would keep this entry for the function's timeout

    async def reap_and_rerun() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        try:
            await asyncio.sleep(1.5)  # the dead worker's lease runs out
            assert await maintenance.reap(state, queue) == 1
        finally:
            await queue.close()
        new_ref = state.get_job(None, job.id).queue_ref
        assert new_ref != dead_ref and queued_refs(arq_settings) == [new_ref]
        await run_worker_until(
            arq_settings, FakeRunner(), lambda: status_of(state, job.id) == JobStatus.SUCCEEDED, 30
        )

    asyncio.run(reap_and_rerun())
    assert queued_refs(arq_settings) == []  # the backlog autoscaling reads is true again


def test_the_reaper_prunes_entries_no_run_will_complete(
    arq_settings: Settings, state: RedisStateStore
) -> None:
    waiting, cancelled, gone = (make_job(state, arq_settings) for _ in range(3))

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        try:
            for job in (waiting, cancelled, gone):
                await queue.enqueue(job)
            state.request_cancel("acme", cancelled.id)
            state.delete_job(gone.id)
            assert await maintenance.prune_queue(state, queue) == 0  # young entries are left alone
            later = time.time() + maintenance.ENTRY_GRACE_S + 1
            assert await maintenance.prune_queue(state, queue, now=later) == 2
        finally:
            await queue.close()

    asyncio.run(scenario())
    assert queued_refs(arq_settings) == [state.get_job(None, waiting.id).queue_ref]
