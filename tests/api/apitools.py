"""Helpers for the API tests: a tiny LeNet with its update and ground truth, upload calls, and a
runner that stands in for the real one (the real one runs in the end-to-end tests)."""

from __future__ import annotations

import json
import threading
import time
from functools import lru_cache
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response

from api.app import create_app
from service.jobs.budget import model_profile
from service.jobs.embedded import EmbeddedQueue
from service.jobs.state import StateStore
from service.jobs.types import GRID_PNG, METRICS_JSON, JobContext, JobResult, Progress
from service.settings import Settings
from service.specs import JobSpec
from service.storage import ArtifactStore

SHAPE = (3, 16, 16)
MODEL_META: dict[str, Any] = {"arch": "lenet", "image_shape": list(SHAPE), "num_classes": 10}
# The smallest valid PNG: one transparent pixel.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000000020001e221bc330000000049454e44ae426082"
)


def make_app(settings: Settings, runner: StubRunner) -> FastAPI:
    """The API with the embedded queue running jobs in a thread with `runner`, and models
    profiled in this process (no profiler process to spawn per test)."""

    def queue(s: Settings, state: StateStore, store: ArtifactStore) -> EmbeddedQueue:
        return EmbeddedQueue(s, state, store, isolation="thread", runner=runner)

    return create_app(settings, queue_factory=queue, profiler=model_profile)


@lru_cache(maxsize=1)
def lenet_files() -> dict[str, bytes]:
    """weights, a FedSGD gradient of one image, and that image as ground truth (safetensors)."""
    import torch

    from service.models import build_model
    from service.specs import DataSpec, ModelSpec
    from service.tensorio import save_safetensors

    model = build_model(ModelSpec(arch="lenet"), DataSpec(shape=SHAPE, num_classes=10))
    x, y = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {
        "weights": save_safetensors(model.state_dict()),
        "gradient": save_safetensors(
            {n: g for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
        ),
        "truth": save_safetensors({"images": x, "labels": y}),
    }


def post_file(
    client: TestClient, path: str, data: bytes, metadata: dict[str, Any] | str | None, **kw: Any
) -> Response:
    form = (
        {}
        if metadata is None
        else {"metadata": metadata if isinstance(metadata, str) else json.dumps(metadata)}
    )
    return client.post(path, files={"file": ("upload.safetensors", data)}, data=form, **kw)


def upload_all(client: TestClient, **kw: Any) -> dict[str, str]:
    """Upload the LeNet, its gradient and the ground truth; return their ids."""
    files = lenet_files()
    model = post_file(client, "/v1/models", files["weights"], MODEL_META, **kw)
    assert model.status_code == 201, model.text
    update_meta = {
        "model_id": model.json()["id"],
        "kind": "gradient",
        "num_images": 1,
        "normalization": "none",
    }
    update = post_file(client, "/v1/updates", files["gradient"], update_meta, **kw)
    assert update.status_code == 201, update.text
    truth = post_file(client, "/v1/ground-truth", files["truth"], None, **kw)
    assert truth.status_code == 201, truth.text
    return {"model": model.json()["id"], "update": update.json()["id"], "truth": truth.json()["id"]}


def friendly_job(ids: dict[str, str], **changes: Any) -> dict[str, Any]:
    """A job request in the friendly form, naming the uploads of `upload_all`."""
    body = {
        "update_id": ids["update"],
        "ground_truth_id": ids["truth"],
        "attack": {"name": "dlg"},
        "budget": {"iterations": 5},
    }
    return {**body, **changes}


def wait_job(client: TestClient, job_id: str, timeout: float = 20.0, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", **kw).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def is_problem(response: Response, status: int) -> dict[str, Any]:
    """Check the problem+json shape of an error response and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["code"]
    assert body["type"] == "urn:gradleak:problem:" + body["code"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


class StubRunner:
    """Reports progress per 'iteration', honours should_stop, writes metrics.json and grid.png.
    With `gate`, it waits for the gate before starting, so a test can hold a job in `running`."""

    def __init__(
        self, iterations: int = 3, delay_s: float = 0.0, gate: threading.Event | None = None
    ) -> None:
        self.iterations, self.delay_s, self.gate = iterations, delay_s, gate
        self.started = threading.Event()

    def __call__(self, spec: JobSpec, ctx: JobContext) -> JobResult:
        self.started.set()
        while self.gate is not None and not self.gate.wait(0.01):
            if ctx.should_stop is not None and ctx.should_stop():
                break
        status: Literal["succeeded", "cancelled"] = "succeeded"
        for i in range(1, self.iterations + 1):
            if ctx.should_stop is not None and ctx.should_stop():
                status = "cancelled"
                break
            if ctx.progress is not None:
                ctx.progress(Progress(stage="attack", iteration=i, total=self.iterations, loss=1.0 / i))
            time.sleep(self.delay_s)
        manifest = {
            "job_id": ctx.job_id,
            "status": status,
            "spec": {},
            "metrics": {"mean": {"psnr": 21.0}},
            "estimate": {"summary": "estimated worst-case PSNR 20.0 dB [17.0, 23.0]"},
        }
        keys = {METRICS_JSON: f"{ctx.prefix}/{METRICS_JSON}", GRID_PNG: f"{ctx.prefix}/{GRID_PNG}"}
        ctx.store.put_bytes(keys[METRICS_JSON], json.dumps(manifest).encode(), "application/json")
        ctx.store.put_bytes(keys[GRID_PNG], PNG, "image/png")
        return JobResult(status=status, manifest=manifest, artifacts=keys)
