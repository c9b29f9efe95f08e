"""Helpers for the job tests: a tiny spec, jobs in a store, a stand-in runner, waiting; the Redis
fixtures the job and study tests share (their conftests import them)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
import redis

from service.jobs.records import JobRecord, UploadRecord, new_id
from service.jobs.state import StateStore
from service.jobs.submit import new_job
from service.jobs.types import JobContext, JobResult, Progress
from service.settings import Settings
from service.specs import JobSpec

REDIS_URL = os.environ.get("GRADLEAK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_client() -> redis.Redis | None:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=1.0)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        return None
    return client


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the test Redis; every key under it is deleted afterwards."""
    client = redis_client()
    if client is None:
        pytest.skip(f"no Redis server answers at {REDIS_URL} (CI starts one)")
    prefix = f"gltest-{secrets.token_hex(6)}"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def arq_settings(redis_prefix: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings of an arq deployment on the test Redis, under `redis_prefix`."""
    from service.jobs.state_redis import RedisStateStore

    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        queue_name=f"{redis_prefix}:queue",
        s3_endpoint=None,
    )
    yield settings
    # arq keeps its own keys (arq:job:<id>, arq:result:<id>, ...); ours carry our records' ids.
    client = redis_client()
    assert client is not None
    state = RedisStateStore(client, redis_prefix)
    kinds = ("job", "fed", "std", "gtr")
    ids = {j.id for kind in kinds for j in state.list_jobs("acme", limit=200, kind=kind)}
    for key in client.scan_iter("arq:*_*"):
        if any(i in key for i in ids):
            client.delete(key)
    client.close()


TINY_SPEC = {
    "model": {"arch": "lenet"},
    "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
    "data": {"shape": [3, 16, 16], "labels": [1]},
    "attack": {"name": "dlg"},
    "budget": {"iterations": 4, "time_limit_s": 60},
}


def make_job(
    state: StateStore, settings: Settings, tenant: str = "acme", spec: dict | None = None, **changes: object
) -> JobRecord:
    job = new_job(JobSpec.model_validate(spec or TINY_SPEC), tenant, settings)
    if changes:
        job = job.model_copy(update=changes)
    created, _ = state.create_job(job)
    return created


def upload(tenant: str = "acme", expires_in: float = 3600.0) -> UploadRecord:
    now = time.time()
    upload_id = new_id("mdl")
    return UploadRecord(
        id=upload_id,
        tenant=tenant,
        kind="model",
        key=f"{tenant}/uploads/{upload_id}/data.safetensors",
        size=10,
        sha256="0" * 64,
        metadata={"arch": "lenet"},
        tensors=2,
        created_at=now,
        expires_at=now + expires_in,
    )


class FakeRunner:
    """Stands in for the runner: reports progress per 'iteration', honours should_stop, writes one
    artifact, or raises what it is told to. `started` is set when it begins."""

    def __init__(self, iterations: int = 3, delay_s: float = 0.0, error: BaseException | None = None) -> None:
        self.iterations, self.delay_s, self.error = iterations, delay_s, error
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, spec: JobSpec, ctx: JobContext) -> JobResult:
        self.calls += 1
        self.started.set()
        if self.error is not None:
            raise self.error
        status: Literal["succeeded", "cancelled"] = "succeeded"
        for i in range(1, self.iterations + 1):
            if ctx.should_stop is not None and ctx.should_stop():
                status = "cancelled"
                break
            if ctx.progress is not None:
                ctx.progress(Progress(stage="attack", iteration=i, total=self.iterations, loss=10.0 / i))
            time.sleep(self.delay_s)
        key = f"{ctx.prefix}/metrics.json"
        manifest = {"job_id": ctx.job_id, "status": status, "metrics": {"psnr": 12.5}}
        ctx.store.put_bytes(key, json.dumps(manifest).encode(), "application/json")
        return JobResult(status=status, manifest=manifest, artifacts={"metrics.json": key})


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A redis-server of a test's own on a free loopback port, to stop and start again. `stop(save=True)`
    is a restart that keeps the data (a snapshot in `directory`, read back on start); `kill()` is a
    crash that loses it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            wait_for(lambda: _answers(client), 10.0, f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self, save: bool = True) -> None:
        """Shut down, writing a snapshot first when `save`."""
        client = redis.Redis(port=self.port)
        with contextlib.suppress(redis.exceptions.ConnectionError):  # it closes the connection on exit
            client.shutdown(save=save, nosave=not save)
        client.close()
        self._reap()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
        self._reap()
        (self.directory / "dump.rdb").unlink(missing_ok=True)  # lost, not an older snapshot restored

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(10.0)
            self.proc = None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
