"""Redis restarts under a real `gradleak worker` process (the real engine, small DLG jobs on LeNet).

Each round, on a redis-server of its own (loopback, a free port):
  restart  a job runs and another waits; Redis shuts down with a snapshot and starts again after
           OUTAGE_S: the running job must finish once (not run again), the waiting one must run,
           and so must a job submitted afterwards
  crash    Redis is killed (its data is lost) and started again after OUTAGE_S: a job submitted
           then must run
The worker process must live through every round. Reported, as medians over ROUNDS: how long
after Redis is back the waiting job starts, how long a job submitted after a restart or a crash
takes to start, and the worker's restarts of its poll loop.

  python -m bench.redis_restart        # writes bench/results/redis-restart.json
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.attacks import machine
from service.jobs.queue import ArqQueue
from service.jobs.records import JobRecord, JobStatus
from service.jobs.state_redis import RedisStateStore
from service.jobs.submit import new_job
from service.settings import Settings
from service.specs import JobSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "redis-restart.json"
ROUNDS = 3
OUTAGE_S = 5.0
SPEC = {
    "model": {"arch": "lenet"},
    "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
    "data": {"shape": [3, 16, 16], "labels": [1]},
    "attack": {"name": "dlg"},
    "budget": {"time_limit_s": 120},
}
LONG, SHORT = 100, 2  # iterations: a job that outlasts the outage (on 2 cores), and a quick one


class Redis:
    def __init__(self, directory: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen([*cmd, "--dir", str(self.directory)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        until(lambda: _ping(client), 10.0)
        client.close()
        return time.monotonic()

    def stop(self, save: bool) -> None:
        assert self.proc is not None
        if save:
            with contextlib.suppress(redis.exceptions.ConnectionError):  # it hangs up on shutdown
                redis.Redis(port=self.port).shutdown(save=True)
        else:
            self.proc.kill()
        self.proc.wait(10.0)
        if not save:  # a crash that loses the data, not a restore of an older snapshot
            (self.directory / "dump.rdb").unlink(missing_ok=True)


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


def until(predicate: Callable[[], bool], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic()
        except redis.exceptions.RedisError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"not within {timeout}s")


def submit(settings: Settings, state: RedisStateStore, iterations: int) -> JobRecord:
    spec = JobSpec.model_validate({**SPEC, "budget": {**SPEC["budget"], "iterations": iterations}})
    job, _ = state.create_job(new_job(spec, "bench", settings))

    async def enqueue() -> None:
        queue = ArqQueue(settings, state)
        await queue.start()
        try:
            await queue.enqueue(job)
        finally:
            await queue.close()

    asyncio.run(enqueue())
    return job


def started(state: RedisStateStore, job: JobRecord) -> bool:
    return state.get_job(None, job.id).status != JobStatus.QUEUED


def succeeded(state: RedisStateStore, job: JobRecord) -> bool:
    current = state.get_job(None, job.id)
    if current.status.terminal and current.status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job.id} {current.status}: {current.error}")
    return current.status == JobStatus.SUCCEEDED


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Redis(Path(tmp))
        server.start()
        url = f"redis://127.0.0.1:{server.port}/0"
        settings = Settings(data_dir=Path(tmp) / "data", redis_url=url, s3_endpoint=None)
        env = {**os.environ, "GRADLEAK_REDIS_URL": url, "GRADLEAK_DATA_DIR": str(settings.data_dir)}
        log = open(Path(tmp) / "worker.log", "w+")  # noqa: SIM115  # read back at the end
        cmd = [sys.executable, "-c", "from service.cli import main; main()", "worker"]
        worker = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        state = RedisStateStore.from_url(url, prefix=settings.redis_prefix)
        rows: list[dict[str, Any]] = []
        try:
            until(lambda: worker.poll() is None and "ready" in Path(log.name).read_text(), 120.0)
            for _ in range(ROUNDS):
                running = submit(settings, state, LONG)
                until(lambda: started(state, running), 60.0)  # noqa: B023
                waiting = submit(settings, state, SHORT)
                server.stop(save=True)
                time.sleep(OUTAGE_S)
                back = server.start()
                until(lambda: succeeded(state, running) and succeeded(state, waiting), 300.0)  # noqa: B023
                # The waiting job starts once the running one ends (one job at a time), or once Redis
                # is back if that was later: measured from the later of the two (wall clock).
                ran, then = state.get_job(None, running.id), state.get_job(None, waiting.id)
                assert ran.finished_at is not None and then.started_at is not None
                waited = then.started_at - max(ran.finished_at, time.time() - (time.monotonic() - back))
                sent = time.monotonic()
                after = submit(settings, state, SHORT)
                after_started = until(lambda: started(state, after), 60.0)  # noqa: B023
                until(lambda: succeeded(state, after), 120.0)  # noqa: B023
                tries = state.get_job(None, running.id).attempts

                server.stop(save=False)  # a crash: the data is gone
                time.sleep(OUTAGE_S)
                crash_back = server.start()
                fresh = submit(settings, state, SHORT)
                fresh_started = until(lambda: started(state, fresh), 120.0)  # noqa: B023
                until(lambda: succeeded(state, fresh), 120.0)  # noqa: B023
                rows.append(
                    {
                        "waiting_job_starts_after_redis_and_worker_free_s": round(waited, 2),
                        "running_job_tries": tries,
                        "submitted_after_restart_starts_s": round(after_started - sent, 2),
                        "submitted_after_crash_starts_after_redis_back_s": round(
                            fresh_started - crash_back, 2
                        ),
                        "worker_alive": worker.poll() is None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            worker.terminate()
            worker.wait(60.0)
            state.close()
            server.stop(save=False)
            log.seek(0)
            text = log.read()
            lost = text.count("lost Redis")
            log.close()
            if len(rows) < ROUNDS:
                print(text[-6000:], file=sys.stderr)

    result = {
        "benchmark": "redis-restart",
        "machine": machine(),
        "rounds": ROUNDS,
        "outage_s": OUTAGE_S,
        "worker_poll_loop_restarts": lost,
        "median": {
            key: statistics.median(r[key] for r in rows) for key in rows[0] if isinstance(rows[0][key], float)
        },
        "all_running_jobs_ran_once": all(r["running_job_tries"] == 1 for r in rows),
        "worker_alive_throughout": all(r["worker_alive"] for r in rows),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"]))


if __name__ == "__main__":
    main()
