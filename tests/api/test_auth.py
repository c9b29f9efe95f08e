"""API keys and tenants: no key 401, another tenant's ids 404, keys off only on loopback."""

from __future__ import annotations

import pytest
from apitools import friendly_job, is_problem, upload_all, wait_job
from fastapi.testclient import TestClient

from api.app import create_app
from api.runtime import KeyCache, auth_enabled
from service.jobs.keys import TOKEN_PREFIX
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings


def test_requests_without_a_valid_key_are_401(auth_client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Basic YTpi"}, {"Authorization": f"Bearer {TOKEN_PREFIX}nope"}):
        response = auth_client.get("/v1/jobs", headers=headers)
        is_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert auth_client.get(path).status_code == 200, path


def test_every_resource_is_scoped_to_its_tenant(auth_client: TestClient, keys: dict[str, str]) -> None:
    acme, other = {"Authorization": keys["acme"]}, {"Authorization": keys["other"]}
    ids = upload_all(auth_client, headers=acme)
    job = auth_client.post("/v1/jobs", json=friendly_job(ids), headers=acme).json()
    wait_job(auth_client, job["id"], headers=acme)

    for path in (
        f"/v1/models/{ids['model']}",
        f"/v1/updates/{ids['update']}",
        f"/v1/ground-truth/{ids['truth']}",
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/jobs/{job['id']}/artifacts/grid.png",
        f"/v1/jobs/{job['id']}/events",
    ):
        assert auth_client.get(path, headers=acme).status_code == 200, path
        is_problem(auth_client.get(path, headers=other), 404)
    is_problem(auth_client.delete(f"/v1/jobs/{job['id']}", headers=other), 404)
    is_problem(auth_client.delete(f"/v1/models/{ids['model']}", headers=other), 404)
    assert auth_client.get("/v1/jobs", headers=other).json()["items"] == []
    # Another tenant's uploads cannot be named in a job either.
    is_problem(auth_client.post("/v1/jobs", json=friendly_job(ids), headers=other), 404)


def test_a_revoked_key_stops_working(
    auth_client: TestClient, keys: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyCache, "TTL_S", 0.0)
    headers = {"Authorization": keys["acme"]}
    assert auth_client.get("/v1/jobs", headers=headers).status_code == 200
    state = SQLiteStateStore(settings.data_dir / "gradleak.db")
    try:
        (record,) = [k for k in state.list_keys() if k.tenant == "acme"]
        state.revoke_key(record.id)
    finally:
        state.close()
    is_problem(auth_client.get("/v1/jobs", headers=headers), 401)


def test_keys_may_be_off_only_on_loopback(settings: Settings) -> None:
    assert not auth_enabled(settings)  # 127.0.0.1, nothing configured
    assert auth_enabled(settings.model_copy(update={"host": "0.0.0.0"}))
    assert auth_enabled(settings.model_copy(update={"host": "::1", "auth_required": True}))
    assert not auth_enabled(settings.model_copy(update={"host": "localhost", "auth_required": False}))
    with pytest.raises(ValueError, match="refusing to serve without API keys"):
        create_app(settings.model_copy(update={"host": "0.0.0.0", "auth_required": False}))
