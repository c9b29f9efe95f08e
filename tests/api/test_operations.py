"""Errors as problem+json with request ids, probes, Prometheus metrics, the catalog, and the rule
that importing the API does not import torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from apitools import StubRunner, is_problem, make_app
from fastapi.testclient import TestClient

from service.settings import Settings


def test_importing_the_api_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import api.app\n"
        "app = api.app.create_app()\n"
        "app.openapi()\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'lpips') if m in sys.modules)\n"
        "print(','.join(heavy) or 'clean')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "clean"


def test_unknown_routes_and_methods_are_problems(client: TestClient) -> None:
    assert "/docs" in is_problem(client.get("/v2/nothing"), 404)["detail"]
    is_problem(client.put("/v1/jobs"), 405)


def test_request_ids_are_echoed_or_made(client: TestClient) -> None:
    response = client.get("/v1/jobs/job_" + "0" * 32, headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42" == is_problem(response, 404)["request_id"]
    response = client.get("/v1/jobs/x", headers={"X-Request-ID": "no spaces allowed"})
    assert response.headers["x-request-id"].startswith("req_")
    assert client.get("/healthz").headers["x-request-id"].startswith("req_")


def test_validation_problems_do_not_echo_the_input(client: TestClient) -> None:
    secret = "private-label-123"
    body = is_problem(client.post("/v1/jobs", json={"update_id": "upd_x", "seed": secret}), 422)
    assert body["code"] == "validation" and body["errors"][0]["loc"] == ["body", "seed"]
    assert secret not in str(body)


@pytest.fixture
def raising_client(settings: Settings, runner: StubRunner) -> Iterator[TestClient]:
    app = make_app(settings, runner)

    async def boom() -> None:
        raise RuntimeError("secret internals")

    async def down() -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to redis")

    app.add_api_route("/boom", boom)
    app.add_api_route("/down", down)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_unexpected_errors_are_500_problems_without_internals(raising_client: TestClient) -> None:
    body = is_problem(raising_client.get("/boom"), 500)
    assert body["code"] == "internal" and "secret" not in str(body)


def test_an_unavailable_backing_service_is_503(raising_client: TestClient) -> None:
    response = raising_client.get("/down")
    assert is_problem(response, 503)["code"] == "unavailable" and response.headers["retry-after"] == "5"


def test_probes(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {
        "status": "ready",
        "checks": {"state": "ok", "store": "ok", "queue": "ok"},
    }

    def unreachable() -> None:
        raise OSError("artifact directory is not writable")

    monkeypatch.setattr(client.app.state.runtime.store, "ping", unreachable)  # type: ignore[attr-defined]
    body = is_problem(client.get("/readyz"), 503)
    assert body["checks"] == {"state": "ok", "store": "failed (OSError)", "queue": "ok"}


def test_metrics(client: TestClient) -> None:
    client.get("/v1/jobs")
    client.get("/v1/jobs/job_" + "0" * 32)
    text = client.get("/metrics").text
    assert 'gradleak_http_requests_total{method="GET",route="/v1/jobs",status="200"} 1.0' in text
    assert 'gradleak_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'gradleak_http_request_duration_seconds_bucket{le="0.1",method="GET",route="/v1/jobs"}' in text
    assert 'gradleak_jobs{state="queued"} 0.0' in text


def test_catalog(client: TestClient) -> None:
    catalog = client.get("/v1/catalog").json()
    attacks = {a["name"]: a["required_knowledge"] for a in catalog["attacks"]}
    assert attacks["dlg"] == 0 and attacks["inverting_gradients"] == 1 and attacks["gradinversion"] == 4
    assert attacks["gias"] == attacks["ggl"] == 2
    lenet = next(a for a in catalog["architectures"] if a["name"] == "lenet")
    assert {k["name"] for k in lenet["knobs"]} >= {"width"}
    assert {d["name"] for d in catalog["defenses"]} >= {"quantize", "topk", "clip", "noise", "sign"}
    assert catalog["metrics"]
    assert [k["level"] for k in catalog["knowledge_levels"]] == [0, 1, 2, 3, 4, 5]
    assert "astronaut" in catalog["photos"]["natural"] and len(catalog["photos"]["face"]) == 100
    ig = next(a for a in catalog["attacks"] if a["name"] == "inverting_gradients")
    assert {f["name"]: f["default"] for f in ig["fields"]}["schedule"] == "cosine"


def test_openapi_documents_problem_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "Problem" in schema["components"]["schemas"]
    upload = schema["paths"]["/v1/models"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert "application/problem+json" in upload["responses"]["default"]["content"]
