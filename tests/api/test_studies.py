"""Studies over HTTP: submit (202 + Location), progress over points, artifacts, cancel, tenant
scoping, and 404/422 for unknown studies and bad or oversized specs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from apitools import StubRunner, is_problem, make_app
from fastapi.testclient import TestClient

from service.settings import Settings

JOB = {
    "model": {"arch": "lenet"},
    "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
    "data": {"shape": [3, 16, 16], "labels": [1]},
    "attack": {"name": "dlg"},
    "budget": {"iterations": 3},
}


def study(**changes: Any) -> dict[str, Any]:
    body = {
        "title": "api",
        "job": JOB,
        "axes": [{"path": "budget.iterations", "values": [2, 3]}],
        "seeds": [0, 1],
    }
    return {"spec": {**body, **changes}}


def wait(client: TestClient, study_id: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/studies/{study_id}", **kw).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"study {study_id} did not finish in {timeout}s")


def test_a_study_runs_its_points_and_serves_its_table_plots_and_report(client: TestClient) -> None:
    r = client.post("/v1/studies", json=study())
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["id"].startswith("std_") and r.headers["location"] == f"/v1/studies/{body['id']}"
    assert body["points"]["total"] == 4 and body["kind"] == "job"
    assert [p["values"] for p in body["items"]] == [{"budget.iterations": v} for v in (2, 2, 3, 3)]
    done = wait(client, body["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["points"] == {
        "total": 4, "done": 4, "succeeded": 4, "failed": 0, "cancelled": 0, "running": 0, "waiting": 0
    }  # fmt: skip
    assert done["progress"]["iteration"] == 4 and done["progress"]["total"] == 4
    point = client.get(f"/v1/jobs/{done['items'][0]['id']}").json()
    assert point["status"] == "succeeded" and point["spec"]["budget"]["iterations"] == 2

    names = {a["name"]: a for a in client.get(f"/v1/studies/{body['id']}/artifacts").json()["items"]}
    assert {
        "table.csv",
        "table.json",
        "report.html",
        "plots/budget.iterations.png",
        "plots/budget.iterations.svg",
    } <= set(names)
    assert names["plots/budget.iterations.svg"]["content_type"] == "image/svg+xml"
    table = client.get(names["table.csv"]["url"])
    assert table.headers["content-type"].startswith("text/csv")
    assert table.text.startswith("point,budget.iterations,seed,status,id,psnr_mean,psnr_worst")
    assert table.text.count("\n") == 5
    report = client.get(f"/v1/studies/{body['id']}/artifacts/report.html")
    assert "sandbox" in report.headers["content-security-policy"]
    listed = client.get("/v1/studies").json()["items"]
    assert [s["id"] for s in listed] == [body["id"]]


def test_unknown_and_malformed_studies_are_404(client: TestClient) -> None:
    for study_id in ("std_" + "0" * 32, "job_" + "0" * 32, "nope"):
        r = client.get(f"/v1/studies/{study_id}")
        assert is_problem(r, 404)
    assert client.delete("/v1/studies/std_" + "0" * 32).status_code == 404


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"axes": [{"path": "budget.iterationz", "values": [1]}]}, "budget has no field 'iterationz'"),
        ({"axes": [{"path": "budget.iterations", "values": [2, 5000]}]}, "budget.iterations=5000"),
        ({"axes": [{"path": "model.arch", "values": ["lenet", "nosuchnet"]}]}, "model.arch='nosuchnet'"),
    ],
)
def test_a_bad_or_oversized_study_is_422_and_queues_nothing(
    client: TestClient, changes: dict[str, Any], words: str
) -> None:
    r = client.post("/v1/studies", json=study(**changes))
    assert is_problem(r, 422), r.text
    assert words in r.text
    assert client.get("/v1/studies").json()["items"] == []
    assert client.get("/v1/jobs").json()["items"] == []


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def gated(settings: Settings, gate: threading.Event) -> Iterator[TestClient]:
    with TestClient(
        make_app(settings.model_copy(update={"max_study_points": 50}), StubRunner(gate=gate))
    ) as c:
        yield c


def test_a_study_over_the_point_limit_is_refused_with_its_count(gated: TestClient) -> None:
    r = gated.post("/v1/studies", json=study(seeds=list(range(30))))
    assert is_problem(r, 422)
    assert "60 points (2 values x 30 seeds); this server's limit is 50 points" in r.text


def test_cancelling_a_study_cancels_its_unfinished_points(gated: TestClient, gate: threading.Event) -> None:
    body = gated.post("/v1/studies", json=study()).json()
    deadline = time.monotonic() + 20
    while gated.get(f"/v1/studies/{body['id']}").json()["points"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = gated.delete(f"/v1/studies/{body['id']}")
    assert r.status_code in (200, 202)
    assert wait(gated, body["id"])["status"] == "cancelled"
    while (done := gated.get(f"/v1/studies/{body['id']}").json())["points"]["done"] < 4:
        assert time.monotonic() < deadline + 20  # the running point stops at its next check
        time.sleep(0.02)
    assert done["points"]["cancelled"] == 4
    assert gated.delete(f"/v1/studies/{body['id']}").status_code in (200, 409)


def test_studies_are_scoped_to_their_tenant(auth_client: TestClient, keys: dict[str, str]) -> None:
    acme, other = ({"Authorization": keys[t]} for t in ("acme", "other"))
    body = auth_client.post("/v1/studies", json=study(), headers=acme).json()
    assert auth_client.get(f"/v1/studies/{body['id']}", headers=other).status_code == 404
    assert auth_client.get("/v1/studies", headers=other).json()["items"] == []
    assert auth_client.get(f"/v1/studies/{body['id']}", headers=acme).status_code == 200
    wait(auth_client, body["id"], headers=acme)
