"""`gradleak worker`: an arq worker on Redis; run one per GPU.

The arq payload is a job id (JSON, never pickle); the job itself is read from the state store.
A job runs in a thread so that the worker's event loop stays free for arq's polling, aborts and
health checks; `execute_job` holds the job's lease while it runs. Timeouts: the arq function's
timeout is the largest budget a tenant may ask for plus the setup grace, and each run is also
stopped at its own budget (`budget.time_limit_s` plus the grace). Retries: only transient
failures (connections, timeouts: `Retry`) and dead workers (the reaper) give a job another try.
Cancelling: the API flags the job in the store and aborts the arq job; either reaches the run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from arq import Retry, func
from arq.worker import Worker, create_worker

from service.jobs.execute import SETUP_GRACE_S, Outcome, Runner, Stopper, StopReason, execute_job
from service.jobs.maintenance import Housekeeper
from service.jobs.queue import (
    ARQ_FEDERATION,
    ARQ_FUNCTION,
    ARQ_STUDY,
    ArqQueue,
    json_deserializer,
    json_serializer,
    redis_settings,
)
from service.jobs.records import MAX_ATTEMPTS, JobError
from service.jobs.state import StateStore, open_state_store
from service.settings import Settings

log = logging.getLogger("gradleak.worker")

RETRY_DELAY_S = 5.0
STOP_WAIT_S = 60.0  # how long a stopped run may take to reach the runner's next stop check
KEEP_RESULT_S = 300  # arq's own result record; the job's result lives in the state store


async def startup(ctx: dict[str, Any]) -> None:
    from service.storage_s3 import make_store

    settings: Settings = ctx["settings"]
    state = open_state_store(settings)
    store = make_store(settings)
    queue = ArqQueue(settings, state, pool=ctx["redis"])
    housekeeper = Housekeeper(state, store, queue)
    housekeeper.start()
    executor = ThreadPoolExecutor(max_workers=settings.worker_concurrency, thread_name_prefix="gradleak-job")
    ctx.update(
        state=state,
        store=store,
        queue=queue,
        housekeeper=housekeeper,
        executor=executor,
        worker_id=f"{socket.gethostname()}:{os.getpid()}",
    )
    # Import torch and the engine now rather than inside the first job's time budget.
    await asyncio.get_running_loop().run_in_executor(executor, _warm_up)
    log.info("gradleak worker %s ready (queue %s)", ctx["worker_id"], settings.queue_name)


def _warm_up() -> None:
    from service.jobs import runner  # noqa: F401


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["housekeeper"].stop()
    ctx["executor"].shutdown(wait=True)
    ctx["state"].close()


async def run_attack(ctx: dict[str, Any], job_id: str) -> str:
    settings: Settings = ctx["settings"]
    state: StateStore = ctx["state"]
    # Each run has its own id: a lease belongs to one run, not to the process.
    worker_id = f"{ctx['worker_id']}:{secrets.token_hex(4)}"
    stopper = Stopper()
    call = functools.partial(
        execute_job,
        job_id,
        state=state,
        store=ctx["store"],
        worker_id=worker_id,
        runner=ctx["runner"],
        stopper=stopper,
        device=settings.device,
        lpips_weights_dir=None if settings.lpips_weights_dir is None else str(settings.lpips_weights_dir),
    )
    run = asyncio.get_running_loop().run_in_executor(ctx["executor"], call)
    try:
        outcome = await asyncio.shield(run)
    except asyncio.CancelledError:
        # arq aborted the job (a user's cancel), the worker is shutting down, or arq's timeout hit.
        if not stopper():
            job = await asyncio.to_thread(state.get_job, None, job_id)
            stopper.stop(StopReason.CANCEL if job.cancel_requested else StopReason.SHUTDOWN)
        try:
            await asyncio.wait_for(asyncio.shield(run), STOP_WAIT_S)
        except TimeoutError:
            log.warning("job %s: the run did not stop within %.0fs; giving the job back", job_id, STOP_WAIT_S)
            reason = JobError(code="interrupted", message="the worker stopped during the run")
            await asyncio.to_thread(state.release, job_id, worker_id, reason)
        raise
    if outcome == Outcome.RELEASED:
        raise Retry(defer=RETRY_DELAY_S)
    return outcome.value


def worker_settings(settings: Settings, runner: Runner | None = None) -> dict[str, Any]:
    """arq's worker settings for this deployment (arq takes a dict as well as a class).
    `runner` replaces the real runner (tests use stand-ins)."""
    return {
        "functions": [
            func(
                run_attack,
                name=name,
                timeout=limit + SETUP_GRACE_S + STOP_WAIT_S,
                # The state store counts tries (MAX_ATTEMPTS); arq must not give up before it does.
                max_tries=2 * MAX_ATTEMPTS,
                keep_result=KEEP_RESULT_S,
            )
            for name, limit in (
                (ARQ_FUNCTION, settings.max_time_limit_s),
                (ARQ_FEDERATION, settings.max_federation_time_limit_s),
                (ARQ_STUDY, settings.max_study_time_limit_s),
            )
        ],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.worker_concurrency,
        "allow_abort_jobs": True,
        "job_serializer": json_serializer,
        "job_deserializer": json_deserializer,
        "ctx": {"settings": settings, "runner": runner},
        "health_check_interval": 30,
    }


def build_worker(settings: Settings, runner: Runner | None = None, **overrides: Any) -> Worker:
    return create_worker(worker_settings(settings, runner), **overrides)


def run_worker(settings: Settings) -> None:
    """Run an arq worker until SIGINT/SIGTERM; a running job goes back to the queue on shutdown."""
    build_worker(settings).run()
