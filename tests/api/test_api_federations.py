"""Federations over HTTP: submit (202 + Location), progress per round, artifacts (nested names),
cancel within a round, tenant scoping, and 422s for specs the loop would refuse."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from apitools import is_problem
from fastapi.testclient import TestClient

from api.app import create_app
from service.jobs.budget import model_profile
from service.jobs.embedded import EmbeddedQueue
from service.jobs.runner import run_job
from service.jobs.state import StateStore
from service.settings import Settings
from service.storage import ArtifactStore

SPEC: dict[str, Any] = {
    "model": {"arch": "mlp", "knobs": {"width": 32}},
    "data": {"per_class": 6, "size": 16, "photos": ["astronaut", "coffee", "chelsea"]},
    "num_clients": 3,
    "rounds": 2,
    "client": {"protocol": "fedavg", "lr": 0.1, "batch_size": 2},
    "audit": {"rounds": [1], "budget": {"iterations": 3}},
}


def spec(**changes: Any) -> dict[str, Any]:
    return {"spec": {**SPEC, **changes}}


@pytest.fixture
def real(settings: Settings) -> Iterator[TestClient]:
    """The API whose embedded worker runs the real runner in a thread."""

    def queue(s: Settings, state: StateStore, store: ArtifactStore) -> EmbeddedQueue:
        return EmbeddedQueue(s, state, store, isolation="thread", runner=run_job)

    with TestClient(create_app(settings, queue_factory=queue, profiler=model_profile)) as c:
        yield c


def wait(client: TestClient, fed_id: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/federations/{fed_id}", **kw).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"federation {fed_id} did not finish in {timeout}s")


def test_a_federation_runs_with_rounds_and_artifacts(real: TestClient) -> None:
    r = real.post("/v1/federations", json=spec())
    assert r.status_code == 202, r.text
    fed = r.json()
    assert fed["id"].startswith("fed_") and r.headers["location"] == f"/v1/federations/{fed['id']}"
    assert fed["spec"]["time_limit_s"] == 6 * 3600.0  # the server's default was filled in
    done = wait(real, fed["id"])
    assert done["status"] == "succeeded", done["error"]
    assert [row["round"] for row in done["rounds"]] == [1, 2]
    assert done["rounds"][0]["psnr_mean"] > 0 and "psnr_mean" not in done["rounds"][1]
    assert done["progress"]["stage"] == "done" and done["progress"]["total"] == 2
    assert done["result"]["final"]["round"] == 2

    names = {a["name"]: a for a in real.get(f"/v1/federations/{fed['id']}/artifacts").json()["items"]}
    for name in ("rounds.csv", "rounds.png", "report.html", "checkpoints/round-002.safetensors"):
        assert name in names
    grid = names["rounds/round-001/grid.png"]
    assert grid["content_type"] == "image/png"
    png = real.get(grid["url"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    csv = real.get(f"/v1/federations/{fed['id']}/artifacts/rounds.csv")
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.startswith("round,test_accuracy")
    report = real.get(f"/v1/federations/{fed['id']}/artifacts/report.html")
    assert "sandbox" in report.headers["content-security-policy"]
    missing = real.get(f"/v1/federations/{fed['id']}/artifacts/rounds/round-002/grid.png")
    assert "rounds/round-001/grid.png" in is_problem(missing, 404)["detail"]

    # federations and jobs are listed apart
    assert [f["id"] for f in real.get("/v1/federations").json()["items"]] == [fed["id"]]
    assert real.get("/v1/jobs").json()["items"] == []
    is_problem(real.get(f"/v1/jobs/{fed['id']}"), 404)


def test_a_running_federation_is_cancelled_within_its_round(real: TestClient) -> None:
    fed = real.post("/v1/federations", json=spec(rounds=500, audit={"rounds": []})).json()
    deadline = time.monotonic() + 30
    while (real.get(f"/v1/federations/{fed['id']}").json()["progress"] or {}).get("iteration", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = real.delete(f"/v1/federations/{fed['id']}")
    assert r.status_code == 202
    done = wait(real, fed["id"], timeout=30)
    assert done["status"] == "cancelled"
    assert 1 <= done["result"]["rounds_completed"] < 500
    assert len(done["rounds"]) == done["result"]["rounds_completed"]
    assert real.delete(f"/v1/federations/{fed['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"clients_per_round": 4}, 422, "clients_per_round=4 is more than"),
        ({"num_clients": 20}, 422, "with no sample"),
        ({"client": {"protocol": "fedavg", "batch_size": 8}}, 422, "batch_size=8 is above client"),
        ({"data": {"source": "cifar10", "path": "/data/cifar"}}, 422, "bundled photo-patch task"),
        ({"data": {"photos": ["astronaut", "nosuchphoto"]}}, 422, "nosuchphoto"),
        ({"rounds": 5000}, 422, "local trainings; this server's limit is"),
        ({"audit": {"rounds": [1], "budget": {"iterations": 5000}}}, 422, "audit.budget.iterations is 5000"),
        ({"audit": {"rounds": [1], "knowledge": 0}}, 422, "needs knowledge level 1"),
        ({"model": {"arch": "nosucharch"}}, 422, "nosucharch"),
        (
            {
                "model": {"arch": "resnet152"},
                "data": {"size": 128, "photos": ["astronaut", "coffee", "chelsea"], "per_class": 20},
                "num_clients": 6,
                "partition": {"samples_per_client": 8},
            },
            422,
            "this job needs an estimated",
        ),
        ({"model": {"arch": "mlp", "weights": "mdl_" + "0" * 32}}, 404, "model.weights"),
    ],
)
def test_bad_federations_are_refused_before_anything_runs(
    client: TestClient, changes: dict[str, Any], status: int, message: str
) -> None:
    body = is_problem(client.post("/v1/federations", json=spec(**changes)), status)
    assert message in body["detail"] or any(message in e["msg"] for e in body.get("errors") or [])
    assert client.get("/v1/federations").json()["items"] == []


def test_federations_are_scoped_to_their_tenant(auth_client: TestClient, keys: dict[str, str]) -> None:
    acme, other = {"Authorization": keys["acme"]}, {"Authorization": keys["other"]}
    fed = auth_client.post("/v1/federations", json=spec(audit={"rounds": []}), headers=acme).json()
    for path in ("", "/artifacts", "/events"):
        is_problem(auth_client.get(f"/v1/federations/{fed['id']}{path}", headers=other), 404)
    is_problem(auth_client.delete(f"/v1/federations/{fed['id']}", headers=other), 404)
    assert auth_client.get("/v1/federations", headers=other).json()["items"] == []
    assert [f["id"] for f in auth_client.get("/v1/federations", headers=acme).json()["items"]] == [fed["id"]]
