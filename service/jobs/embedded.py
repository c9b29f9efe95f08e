"""The embedded default's queue: jobs wait in the state store (SQLite) and one worker runs them,
one at a time, beside the API.

The worker is a child process by default: the attack never holds the API's GIL or event loop,
a crash in it cannot take the API down, and it runs at a lower CPU priority so status requests
stay fast while it works. (`isolation="thread"` runs jobs in a thread of the API process instead;
tests use it to run stand-in runners.) Nothing waits only in memory: the dispatcher takes the
oldest waiting job from the store, so a restarted server picks up where the last one stopped.

A server killed with SIGKILL cannot stop its worker process, which would go on with its attack
beside the next server's. So the worker watches its parent and exits when it is gone, and the
server records the worker (pid and start time, with its own) in `embedded-worker.pid` under the
data directory: a server starting on that directory kills a recorded worker whose server is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Literal, Protocol

import psutil

from service.jobs.execute import Outcome, Runner, Stopper, StopReason, execute_job
from service.jobs.queue import QueueEntry
from service.jobs.records import JobError, JobRecord
from service.jobs.state import StateStore, open_state_store
from service.settings import Settings
from service.storage import ArtifactStore

log = logging.getLogger("gradleak.embedded")

IDLE_POLL_S = 2.0  # a safety net: enqueue() wakes the dispatcher at once
SKIP_PAUSE_S = 0.5
CHILD_NICENESS = 10
CLOSE_WAIT_S = 30.0
PARENT_CHECK_S = 1.0  # how soon a worker process notices that its server is gone
PID_FILE = "embedded-worker.pid"

Isolation = Literal["process", "thread"]


class WorkerDiedError(Exception):
    pass


class _Worker(Protocol):
    def run(self, job_id: str, worker_id: str) -> Outcome: ...

    def stop(self) -> None:
        """Stop the running job so that it goes back to the queue."""
        ...

    def close(self) -> None: ...


class _ThreadWorker:
    def __init__(
        self, settings: Settings, state: StateStore, store: ArtifactStore, runner: Runner | None
    ) -> None:
        self.settings, self.state, self.store, self.runner = settings, state, store, runner
        self._stopper: Stopper | None = None

    def run(self, job_id: str, worker_id: str) -> Outcome:
        self._stopper = Stopper()
        return execute_job(
            job_id,
            state=self.state,
            store=self.store,
            worker_id=worker_id,
            runner=self.runner,
            stopper=self._stopper,
            device=self.settings.device,
            lpips_weights_dir=_optional_str(self.settings.lpips_weights_dir),
        )

    def stop(self) -> None:
        if self._stopper is not None:
            self._stopper.stop(StopReason.SHUTDOWN)

    def close(self) -> None:
        self.stop()


def _identity(pid: int) -> list[float] | None:
    """A process as [pid, start time], which a reused pid cannot match; None if there is none."""
    try:
        return [pid, psutil.Process(pid).create_time()]
    except psutil.Error:
        return None


def _alive(identity: object) -> bool:
    return isinstance(identity, list) and len(identity) == 2 and _identity(int(identity[0])) == identity


def reap_orphan_worker(data_dir: Path) -> int | None:
    """Kill the worker process a previous server on `data_dir` left running; return its pid if
    there was one. A worker whose server still runs (another server on the same directory) is
    left alone."""
    path = data_dir / PID_FILE
    try:
        recorded = json.loads(path.read_text())
        worker, server = recorded["worker"], recorded["server"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not _alive(worker):
        path.unlink(missing_ok=True)
        return None
    if _alive(server):
        log.warning("another gradleak server (pid %s) uses %s; leaving its worker alone", server[0], data_dir)
        return None
    pid = int(worker[0])
    log.warning("killing worker process %d, left running by a server that was killed", pid)
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(10.0)
    path.unlink(missing_ok=True)
    return pid


def _record_worker(data_dir: Path, pid: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    record = {"worker": _identity(pid), "server": _identity(os.getpid())}
    (data_dir / PID_FILE).write_text(json.dumps(record))


def _exit_with_parent(parent: int) -> None:
    # POSIX reparents an orphan (to init or a subreaper): a changed parent pid means the server is gone.
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    log.warning("the gradleak server (pid %d) is gone; stopping its worker process", parent)
    os._exit(1)


class _ProcessWorker:
    """One long-lived child process (spawned, not forked: the parent runs threads) fed job ids."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def _ensure_started(self) -> tuple[BaseProcess, Connection]:
        with self._lock:
            if self._proc is None or not self._proc.is_alive() or self._conn is None:
                ctx = multiprocessing.get_context("spawn")
                parent, child = ctx.Pipe()
                self._proc = ctx.Process(
                    target=child_main,
                    args=(child, self.settings, os.getpid()),
                    name="gradleak-worker",
                    daemon=True,
                )
                self._proc.start()
                child.close()
                self._conn = parent
                if self._proc.pid is not None:
                    _record_worker(self.settings.data_dir, self._proc.pid)
            return self._proc, self._conn

    def run(self, job_id: str, worker_id: str) -> Outcome:
        proc, conn = self._ensure_started()
        conn.send((job_id, worker_id))
        ready = wait([conn, proc.sentinel])
        if conn in ready:
            with contextlib.suppress(EOFError, OSError):
                return Outcome(conn.recv())
        proc.join(5.0)
        code = proc.exitcode
        with self._lock:
            self._proc = self._conn = None
        raise WorkerDiedError(f"exit code {code}" if code is not None else "no exit code")

    def stop(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def close(self) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if proc is None or conn is None:
            return
        with contextlib.suppress(OSError):
            conn.send(None)
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        conn.close()
        (self.settings.data_dir / PID_FILE).unlink(missing_ok=True)


def child_main(conn: Connection, settings: Settings, parent: int) -> None:
    """The worker process: runs the job ids it is sent, one at a time, until told to stop or until
    its server is gone."""
    # The parent decides when to stop; a Ctrl-C in the terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)
    import torch

    # Leave a core to the API process so that a running attack does not slow its requests.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    from service.jobs import runner
    from service.storage_s3 import make_store

    state, store = open_state_store(settings), make_store(settings)
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the API process is gone
                return
            if message is None:
                return
            job_id, worker_id = message
            outcome = execute_job(
                job_id,
                state=state,
                store=store,
                worker_id=worker_id,
                runner=runner.run_job,
                device=settings.device,
                lpips_weights_dir=_optional_str(settings.lpips_weights_dir),
            )
            conn.send(outcome.value)
    finally:
        state.close()


class EmbeddedQueue:
    def __init__(
        self,
        settings: Settings,
        state: StateStore,
        store: ArtifactStore,
        *,
        isolation: Isolation = "process",
        runner: Runner | None = None,
    ) -> None:
        if isolation == "process" and runner is not None:
            raise ValueError("a custom runner needs isolation='thread'; the worker process uses the real one")
        self.state = state
        self._data_dir = settings.data_dir if isolation == "process" else None
        self._worker: _Worker = (
            _ProcessWorker(settings)
            if isolation == "process"
            else _ThreadWorker(settings, state, store, runner)
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._running: str | None = None
        self._worker_prefix = f"embedded:{socket.gethostname()}:{os.getpid()}"

    async def start(self) -> None:
        if self._data_dir is not None:
            await asyncio.to_thread(reap_orphan_worker, self._data_dir)
        self._task = asyncio.create_task(self._dispatch(), name="gradleak-dispatcher")

    async def enqueue(self, job: JobRecord) -> None:
        self._wake.set()

    async def cancel(self, job: JobRecord) -> None:
        """Nothing to do: the running job's heartbeat sees the cancel in the store within a second."""

    async def ensure_queued(self, job: JobRecord) -> None:
        self._wake.set()

    async def entries(self, before: float, limit: int) -> list[QueueEntry]:
        return []  # waiting jobs are the state store's records: there is no entry to go stale

    async def discard(self, ref: str) -> None:
        """Nothing to remove (see `entries`)."""

    async def ping(self) -> None:
        if self._task is None or self._task.done():
            raise RuntimeError("the embedded worker's dispatcher is not running")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._running is not None:
            self._worker.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, CLOSE_WAIT_S)
            except TimeoutError:
                log.warning("the running job did not stop within %.0fs", CLOSE_WAIT_S)
        await asyncio.to_thread(self._worker.close)

    async def _dispatch(self) -> None:
        while not self._closing:
            self._wake.clear()  # before looking, so that an enqueue after the look is not missed
            try:
                jobs = await asyncio.to_thread(self.state.runnable, 1)
            except Exception:
                log.exception("cannot read waiting jobs from the state store")
                jobs = []
            if not jobs:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                continue
            try:
                await self._run_one(jobs[0])
            except Exception:  # keep dispatching: the store may be back on the next round
                log.exception("job %s: could not be run", jobs[0].id)
                await asyncio.sleep(SKIP_PAUSE_S)

    async def _run_one(self, job: JobRecord) -> None:
        worker_id = f"{self._worker_prefix}:{secrets.token_hex(4)}"
        self._running = job.id
        try:
            outcome = await asyncio.to_thread(self._worker.run, job.id, worker_id)
        except WorkerDiedError as e:
            if self._closing:
                reason = JobError(code="interrupted", message="the server shut down during the run")
            else:
                log.error("job %s: the worker process died (%s)", job.id, e)
                reason = JobError(code="worker_died", message=f"the worker process died during the run ({e})")
            await asyncio.to_thread(self.state.release, job.id, worker_id, reason)
            return
        finally:
            self._running = None
        if outcome in (Outcome.SKIPPED, Outcome.DEFERRED):
            await asyncio.sleep(SKIP_PAUSE_S)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)
