"""The production setup end to end, with real processes: `gradleak serve` (uvicorn) and two
`gradleak worker`s on Redis, artifacts on S3 (a moto server). Upload -> job -> artifacts; then a
worker is killed with SIGKILL mid-job and the job must end retried on the other worker (or failed
with a reason), never stuck in `running`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("GRADLEAK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BIN = Path(sys.executable).parent
SHAPE = (3, 16, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def lenet_files() -> dict[str, bytes]:
    import torch

    from service.models import build_model
    from service.specs import DataSpec, ModelSpec
    from service.tensorio import save_safetensors

    model = build_model(ModelSpec(arch="lenet"), DataSpec(shape=SHAPE, num_classes=10))
    x, y = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([4])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {
        "weights": save_safetensors(model.state_dict()),
        "gradient": save_safetensors(
            {n: g for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
        ),
        "truth": save_safetensors({"images": x, "labels": y}),
    }


@dataclass
class Deployment:
    url: str
    headers: dict[str, str]
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]]
    logs: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30.0)

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.logs / f"worker-{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen([str(BIN / "gradleak"), "worker"], env=self.env, stdout=log, stderr=log)
        self.workers.append(proc)
        return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis server answers at {REDIS_URL} (CI starts one)")
    logs = tmp_path_factory.mktemp("e2e")
    prefix = f"gle2e-{secrets.token_hex(4)}"
    s3_port, api_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    moto_log = (logs / "moto.log").open("wb")
    procs.append(
        subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=moto_log,
            stderr=moto_log,
        )
    )
    env = {
        **os.environ,
        "GRADLEAK_DATA_DIR": str(logs / "data"),
        "GRADLEAK_REDIS_URL": REDIS_URL,
        "GRADLEAK_REDIS_PREFIX": prefix,
        "GRADLEAK_QUEUE_NAME": f"{prefix}:queue",
        "GRADLEAK_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "GRADLEAK_S3_ACCESS_KEY": "testing",
        "GRADLEAK_S3_SECRET_KEY": "testing",
        "GRADLEAK_S3_BUCKET": prefix,
        "GRADLEAK_S3_REGION": "us-east-1",
        "GRADLEAK_S3_SECURE": "false",
        "GRADLEAK_AUTH_REQUIRED": "true",
        "GRADLEAK_MAX_UPLOAD_BYTES": str(1 << 20),
        "OMP_NUM_THREADS": "1",
    }
    created = subprocess.run(
        [str(BIN / "gradleak"), "keys", "create", "--tenant", "e2e"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    api_log = (logs / "api.log").open("wb")
    api = subprocess.Popen(
        [str(BIN / "gradleak"), "serve", "--host", "127.0.0.1", "--port", str(api_port)],
        env=env,
        stdout=api_log,
        stderr=api_log,
    )
    procs.append(api)
    deployment = Deployment(f"http://127.0.0.1:{api_port}", {"Authorization": f"Bearer {key}"}, env, [], logs)
    try:
        deployment.start_worker()
        deployment.start_worker()
        wait_until(
            lambda: httpx.get(f"{deployment.url}/readyz").status_code == 200, 60, "the API to be ready"
        )
        yield deployment
    finally:
        for proc in [*deployment.workers, *procs[::-1]]:
            stop(proc)
        # arq's own keys are global (arq:job:<job id>:<try>:<n>, ...): delete those of our jobs only.
        ours = {name.decode().rsplit(":", 1)[-1] for name in client.scan_iter(f"{prefix}:job:*")}
        for name in client.scan_iter("arq:*job_*"):
            if name.decode().split(":")[2] in ours:
                client.delete(name)
        for name in client.scan_iter(f"{prefix}*"):
            client.delete(name)
        client.close()


def upload(c: httpx.Client) -> dict[str, str]:
    files = lenet_files()
    meta = {"arch": "lenet", "image_shape": list(SHAPE), "num_classes": 10}
    model = c.post("/v1/models", files={"file": files["weights"]}, data={"metadata": json.dumps(meta)})
    assert model.status_code == 201, model.text
    update_meta = {"model_id": model.json()["id"], "kind": "gradient", "labels": [4], "normalization": "none"}
    update = c.post(
        "/v1/updates", files={"file": files["gradient"]}, data={"metadata": json.dumps(update_meta)}
    )
    assert update.status_code == 201, update.text
    truth = c.post("/v1/ground-truth", files={"file": files["truth"]})
    assert truth.status_code == 201, truth.text
    return {"update": update.json()["id"], "truth": truth.json()["id"]}


def finished(c: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = c.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def test_upload_job_artifacts(deployment: Deployment) -> None:
    with deployment.client() as c:
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer glk_wrong"}).status_code == 401
        ids = upload(c)
        body = {"update_id": ids["update"], "ground_truth_id": ids["truth"], "attack": {"name": "dlg"}}
        body["budget"] = {"iterations": 5, "time_limit_s": 60}
        created = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert created.status_code == 202, created.text
        again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert again.json()["id"] == created.json()["id"]
        job = wait_until(lambda: finished(c, created.json()["id"]), 120, "the job to finish")
        assert job["status"] == "succeeded", job["error"]
        assert job["metrics"] is not None and job["progress"]["stage"] == "done"

        artifacts = {a["name"]: a for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
        assert set(artifacts) == {"metrics.json", "grid.png", "reconstruction.safetensors", "report.html"}
        assert artifacts["grid.png"]["presigned_url"].startswith(deployment.env["GRADLEAK_S3_ENDPOINT"])
        redirect = c.get(f"/v1/jobs/{job['id']}/artifacts/grid.png")
        assert redirect.status_code == 307
        png = httpx.get(redirect.headers["location"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        metrics = c.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json", follow_redirects=True).json()
        assert metrics["job_id"] == job["id"] and metrics["seed"] == 0

        prometheus = httpx.get(f"{deployment.url}/metrics").text
        assert 'gradleak_jobs{state="succeeded"}' in prometheus


def test_an_oversized_upload_is_refused_before_its_body_is_sent(deployment: Deployment) -> None:
    host, port = deployment.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = (
            f"POST /v1/models HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: {deployment.headers['Authorization']}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000000\r\n\r\n"
        )
        s.sendall(head.encode())  # and no body at all
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "application/problem+json" in reply


def test_a_worker_killed_mid_job_does_not_leave_it_running(deployment: Deployment) -> None:
    with deployment.client() as c:
        ids = upload(c)
        body = {"update_id": ids["update"], "attack": {"name": "inverting_gradients"}}
        body["budget"] = {"iterations": 20_000, "time_limit_s": 6}
        body["verdict"] = {"when": "never"}  # the kill is the point: no shadow audits after the attack
        job_id = c.post("/v1/jobs", json=body).json()["id"]

        def running() -> dict[str, Any] | None:
            job = c.get(f"/v1/jobs/{job_id}").json()
            progress = job["progress"] or {}
            return job if job["status"] == "running" and progress.get("stage") == "attack" else None

        wait_until(running, 120, "the attack to start")
        os.kill(_worker_pid(deployment, job_id), signal.SIGKILL)
        done = wait_until(lambda: finished(c, job_id), 120, "the job to end after the kill")
    assert done["status"] in ("succeeded", "failed")
    if done["status"] == "succeeded":
        assert done["attempts"] == 2
    else:
        assert done["error"]["message"]


def _worker_pid(deployment: Deployment, job_id: str) -> int:
    """The pid of the worker running the job: the one whose log names the job as started."""
    for i, proc in enumerate(deployment.workers):
        log = (deployment.logs / f"worker-{i}.log").read_text(errors="replace")
        if f"job {job_id}: started" in log and proc.poll() is None:
            return proc.pid
    raise AssertionError("no live worker has started the job")
