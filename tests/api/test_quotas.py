"""Budgets and quotas over HTTP: an over-budget spec is refused with its estimate, without
building the model; a tenant over its rate, its waiting jobs or its stored bytes gets 429 with
Retry-After; an API key's overrides apply to its requests only; Redis-backed counters are shared
by API replicas."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apitools import (
    MODEL_META,
    StubRunner,
    friendly_job,
    is_problem,
    lenet_files,
    make_app,
    post_file,
    upload_all,
)
from fastapi.testclient import TestClient

from api.ratelimit import RateLimiter
from service.jobs.keys import create_key
from service.jobs.quotas import QuotaExceededError, Quotas
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings

REDIS_URL = os.environ.get("GRADLEAK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HOSTILE_SPEC = {
    "spec": {
        "model": {"arch": "resnet152"},
        "update": {"kind": "gradient", "simulate": {"source": "photos"}},
        "data": {"shape": [3, 512, 512]},
    }
}
SMALL_SPEC = {
    "spec": {
        "model": {"arch": "lenet"},
        "update": {"kind": "gradient", "simulate": {"source": "photos", "images": ["astronaut"]}},
        "data": {"shape": [3, 32, 32]},
        "budget": {"iterations": 2},
    }
}


def _client(settings: Settings, runner: StubRunner, **changes: Any) -> TestClient:
    return TestClient(make_app(settings.model_copy(update=changes), runner))


def test_over_budget_spec_is_refused_with_its_estimate_without_building_the_model(
    client: TestClient,
) -> None:
    # warm the registries (torch, torchvision) so that only the request's own allocations count
    assert client.post("/v1/jobs", json=SMALL_SPEC).status_code == 202
    tracemalloc.start()
    try:
        response = client.post("/v1/jobs", json=HOSTILE_SPEC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    body = is_problem(response, 422)
    assert body["code"] == "budget"
    estimate = body["estimate"]
    assert estimate["limit_bytes"] == 8 * 2**30
    assert estimate["total_bytes"] > estimate["limit_bytes"]
    assert estimate["parameters"] > 50_000_000  # ResNet-152
    assert "GiB" in body["detail"] and "resnet152" in body["detail"]
    # building the real ResNet-152 allocates its 58M float parameters (230 MB); the meta device none
    assert peak < 30 * 2**20, peak
    assert len(client.get("/v1/jobs").json()["items"]) == 1  # nothing was queued


def test_a_small_spec_passes_a_small_worker_memory_setting_only_when_it_fits(
    settings: Settings, runner: StubRunner
) -> None:
    with _client(settings, runner, worker_memory_bytes=2 * 2**30) as c:
        assert c.post("/v1/jobs", json=SMALL_SPEC).status_code == 202
    with _client(settings, runner, worker_memory_bytes=256 * 2**20) as c:
        body = is_problem(c.post("/v1/jobs", json=SMALL_SPEC), 422)
        assert body["estimate"]["total_bytes"] > 256 * 2**20


def test_rapid_submissions_get_429_after_the_burst(settings: Settings, runner: StubRunner) -> None:
    with _client(settings, runner, rate_write_burst=10, rate_write_per_s=1.0) as c:
        codes = [c.post("/v1/jobs", json=SMALL_SPEC) for _ in range(200)]
        assert [r.status_code for r in codes[:10]] == [202] * 10
        refused = codes[10:]
        assert all(r.status_code == 429 for r in refused)
        body = is_problem(refused[0], 429)
        assert body["code"] == "quota_exceeded" and body["quota"] == "rate_write"
        assert 1 <= int(refused[0].headers["retry-after"]) <= 10
        # reads have their own window: status stays available to a tenant that floods writes
        assert c.get("/v1/jobs").status_code == 200


def test_waiting_jobs_quota(settings: Settings) -> None:
    gate = threading.Event()  # holds the first job running, so the others wait
    try:
        with _client(settings, StubRunner(gate=gate), max_queued_jobs=3) as c:
            accepted = [c.post("/v1/jobs", json=SMALL_SPEC) for _ in range(4)]
            assert all(r.status_code == 202 for r in accepted)  # one running, three waiting
            body = is_problem(c.post("/v1/jobs", json=SMALL_SPEC), 429)
            assert body["quota"] == "max_queued_jobs" and body["limit"] == 3
            assert int(c.post("/v1/jobs", json=SMALL_SPEC).headers["retry-after"]) >= 1
            # a retry of an accepted job (same Idempotency-Key) is no new job: it is answered
            key = {"Idempotency-Key": "first"}
            c.delete(f"/v1/jobs/{accepted[-1].json()['id']}")
            first = c.post("/v1/jobs", json=SMALL_SPEC, headers=key)
            assert first.status_code == 202
            again = c.post("/v1/jobs", json=SMALL_SPEC, headers=key)
            assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    finally:
        gate.set()


def test_stored_bytes_quota(settings: Settings, runner: StubRunner) -> None:
    weights = lenet_files()["weights"]
    with _client(settings, runner, max_stored_bytes=2 * len(weights) + 100) as c:
        stored = [post_file(c, "/v1/models", weights, MODEL_META) for _ in range(2)]
        assert [r.status_code for r in stored] == [201, 201]
        response = post_file(c, "/v1/models", weights, MODEL_META)
        body = is_problem(response, 429)
        assert body["quota"] == "max_stored_bytes" and "retry-after" in response.headers
        # deleting an upload frees its bytes
        assert c.delete(f"/v1/models/{stored[0].json()['id']}").status_code == 204
        assert post_file(c, "/v1/models", weights, MODEL_META).status_code == 201


@pytest.fixture
def quota_keys(settings: Settings) -> dict[str, str]:
    state = SQLiteStateStore(settings.data_dir / "gradleak.db")
    try:
        tight = create_key(state, "acme", "tight", quotas={"rate_write_burst": 2, "rate_write_per_s": 0.1})
        plain = create_key(state, "other", "plain")
        return {"acme": f"Bearer {tight[0]}", "other": f"Bearer {plain[0]}"}
    finally:
        state.close()


def test_key_overrides_apply_to_its_tenant_only(
    settings: Settings, runner: StubRunner, quota_keys: dict[str, str]
) -> None:
    with _client(settings, runner, auth_required=True, rate_write_burst=50) as c:
        acme, other = ({"Authorization": quota_keys[t]} for t in ("acme", "other"))
        codes = [c.post("/v1/jobs", json=SMALL_SPEC, headers=acme).status_code for _ in range(4)]
        assert codes == [202, 202, 429, 429]
        retry = c.post("/v1/jobs", json=SMALL_SPEC, headers=acme).headers["retry-after"]
        assert 1 <= int(retry) <= 20
        assert [c.post("/v1/jobs", json=SMALL_SPEC, headers=other).status_code for _ in range(4)] == [202] * 4


def test_uploads_and_jobs_of_a_tenant_count_together_per_tenant(
    settings: Settings, runner: StubRunner
) -> None:
    with _client(settings, runner, rate_write_burst=4, rate_write_per_s=0.5) as c:
        ids = upload_all(c)  # three uploads
        assert c.post("/v1/jobs", json=friendly_job(ids)).status_code == 202
        is_problem(c.post("/v1/jobs", json=friendly_job(ids)), 429)


@pytest.fixture
def redis_settings(tmp_path: Path) -> Iterator[Settings]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis server answers at {REDIS_URL}")
    prefix = f"gltest-{secrets.token_hex(6)}"
    yield Settings(data_dir=tmp_path, redis_url=REDIS_URL, redis_prefix=prefix)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def test_redis_counters_are_shared_by_api_replicas(redis_settings: Settings) -> None:
    quotas = Quotas.from_settings(redis_settings).with_overrides({"rate_write_burst": 3})

    async def scenario() -> None:
        replicas = [RateLimiter(redis_settings), RateLimiter(redis_settings)]
        for i in range(3):
            await replicas[i % 2].hit("acme", "POST", quotas)
        for replica in replicas:
            with pytest.raises(QuotaExceededError) as refused:
                await replica.hit("acme", "POST", quotas)
            assert refused.value.retry_after_s >= 1
        await replicas[1].hit("other", "POST", quotas)  # another tenant has its own window

    asyncio.run(scenario())
