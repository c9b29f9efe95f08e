"""`gradleak worker`: an arq worker on Redis; run one per GPU.

The arq payload is a job id (JSON, never pickle); the job itself is read from the state store.
A job runs in a thread so that the worker's event loop stays free for arq's polling, aborts and
health checks; `execute_job` holds the job's lease while it runs. Timeouts: the arq function's
timeout is the largest budget a tenant may ask for plus the setup grace, and each run is also
stopped at its own budget (`budget.time_limit_s` plus the grace). Retries: only transient
failures (connections, timeouts: `Retry`) and dead workers (the reaper) give a job another try.
Cancelling: the API flags the job in the store and aborts the arq job; either reaches the run.

Redis restarts: arq's poll loop ends on the first Redis error, and its `run()` would then wait for
the running jobs and exit. `supervise` runs the same arq Worker again once Redis answers, with
backoff: its running jobs are tasks of that Worker and simply carry on (a run records its outcome
once the store is back, see execute.py), its job slots stay counted, and polling resumes where
it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.exceptions
from arq import Retry, func
from arq.worker import Worker, create_worker

from service.jobs.execute import SETUP_GRACE_S, Outcome, Runner, Stopper, StopReason, execute_job
from service.jobs.maintenance import Housekeeper
from service.jobs.queue import (
    ARQ_FEDERATION,
    ARQ_FUNCTION,
    ARQ_STUDY,
    ARQ_TRAINING,
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
RECONNECT_MIN_S = 0.25  # first wait after losing Redis; doubles up to RECONNECT_MAX_S, with jitter
RECONNECT_MAX_S = 5.0
# What a lost or restarting Redis raises (redis-py wraps socket errors; BusyLoadingError, a Redis
# still loading its snapshot, is a ConnectionError).
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)
# ResponseError: LOADING, while a restarted Redis reads its snapshot.
REDIS_NOT_READY: tuple[type[Exception], ...] = (*REDIS_DOWN, redis.exceptions.ResponseError)


async def startup(ctx: dict[str, Any]) -> None:
    if "state" in ctx:
        return  # arq calls this again each time `supervise` resumes its poll loop
    from service.storage_s3 import make_store

    settings: Settings = ctx["settings"]
    state = open_state_store(settings)
    store = make_store(settings)
    queue = ArqQueue(settings, state, pool=ctx["redis"])
    housekeeper = Housekeeper(state, store, queue, orphan_age_s=settings.retention_hours * 3600.0)
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
    if ctx.get("closed"):
        return
    ctx["closed"] = True
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
    if outcome in (Outcome.RELEASED, Outcome.DEFERRED):
        # a deferral counts as an arq try; should arq give up, the reaper queues the job again
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
                (ARQ_TRAINING, settings.max_training_time_limit_s),
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


async def supervise(arq_worker: Worker) -> None:
    """Run `arq_worker` until it is stopped, through any number of Redis outages."""
    while True:
        try:
            await arq_worker.async_run()
            return  # a burst worker that emptied its queue
        except REDIS_DOWN as e:
            lost = time.monotonic()
            running = sum(not t.done() for t in arq_worker.tasks.values())
            log.warning(
                "lost Redis (%s); %d running job(s) carry on; reconnecting with backoff",
                type(e).__name__,
                running,
            )
        await _wait_for_redis(arq_worker)  # meanwhile, the done-callbacks of ended jobs have run
        _recount_slots(arq_worker)
        log.info("Redis is back after %.1fs; polling the queue again", time.monotonic() - lost)


def _recount_slots(arq_worker: Worker) -> None:
    # arq counts a job slot before the Redis calls that start the job; an error in between would
    # leak the slot for the worker's lifetime. Give back what the jobs really running do not hold.
    running = sum(not t.done() for t in arq_worker.tasks.values())
    for _ in range(max(arq_worker.job_counter - running, 0)):
        arq_worker.sem.release()
        arq_worker.job_counter -= 1


async def _wait_for_redis(arq_worker: Worker) -> None:
    delay = RECONNECT_MIN_S
    while True:
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(2 * delay, RECONNECT_MAX_S)
        pool = arq_worker.ctx.get("redis")
        if pool is None:
            return  # arq had not connected yet: its next run connects (or fails, and we wait again)
        try:
            # The pool's idle connections all point at the lost server: drop them, not one per error.
            await pool.connection_pool.disconnect(inuse_connections=False)
            await pool.ping()
            return
        except REDIS_NOT_READY:
            continue


def run_worker(settings: Settings) -> None:
    """Run an arq worker until SIGINT/SIGTERM, through Redis outages; a running job goes back to the
    queue on shutdown."""
    arq_worker = build_worker(settings)
    loop = arq_worker.loop
    supervisor = loop.create_task(supervise(arq_worker))

    def stop(_signal: signal.Signals) -> None:
        # arq's signal handler cancels the running jobs and its poll loop; this ends the supervision.
        supervisor.cancel()

    arq_worker.on_stop = stop
    try:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(supervisor)
    finally:
        loop.run_until_complete(close_worker(arq_worker))


async def close_worker(arq_worker: Worker) -> None:
    """arq's close, then our own resources if it could not finish: it needs Redis for its last
    bookkeeping, and it fails on a job task it cancelled in the middle of that task's bookkeeping."""
    try:
        await arq_worker.close()
        return
    except REDIS_DOWN as e:
        log.warning("Redis unreachable at shutdown (%s); closing without it", type(e).__name__)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this close itself is being cancelled
    if "state" in arq_worker.ctx:
        await shutdown(arq_worker.ctx)  # does nothing if arq's close got as far as calling it
    pool = arq_worker.ctx.get("redis")
    if pool is not None:
        with contextlib.suppress(*REDIS_DOWN):
            await pool.aclose()
