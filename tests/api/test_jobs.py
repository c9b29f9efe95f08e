"""Jobs through the API: both request forms, checks before queueing, idempotency, listing,
cancelling, events and artifacts."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from apitools import PNG, StubRunner, friendly_job, is_problem, make_app, upload_all, wait_job
from fastapi.testclient import TestClient


@pytest.fixture
def ids(client: TestClient) -> dict[str, str]:
    return upload_all(client)


def full_spec(ids: dict[str, str], **changes: Any) -> dict[str, Any]:
    spec = {
        "model": {"arch": "lenet", "weights": ids["model"]},
        "update": {"kind": "gradient", "artifact": ids["update"]},
        "data": {"shape": [3, 16, 16], "num_classes": 10, "num_images": 1},
        "attack": {"name": "inverting_gradients"},
        "budget": {"iterations": 5},
        "ground_truth": ids["truth"],
    }
    return {"spec": {**spec, **changes}}


def test_submit_from_uploads_and_follow_to_the_result(client: TestClient, ids: dict[str, str]) -> None:
    created = client.post("/v1/jobs", json=friendly_job(ids))
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["status"] == "queued"
    spec = job["spec"]
    assert spec["model"] == {
        "arch": "lenet",
        "knobs": {},
        "weights": ids["model"],
        "init_seed": 0,
        "source": None,
    }
    assert spec["update"]["artifact"] == ids["update"] and spec["ground_truth"] == ids["truth"]
    assert spec["data"]["num_images"] == 1 and spec["data"]["normalization"] == "none"
    assert spec["budget"]["time_limit_s"] == 300.0  # the server's default filled in

    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["metrics"] == {"mean": {"psnr": 21.0}} and "spec" not in done["result"]
    assert done["estimate"]["summary"].startswith("estimated worst-case PSNR")
    assert done["progress"]["iteration"] == 3 and done["progress"]["best_loss"] == pytest.approx(1 / 3)

    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
    assert {a["name"] for a in artifacts} == {"metrics.json", "grid.png"}
    assert all(a["presigned_url"] is None for a in artifacts)  # a local store streams
    grid = client.get(f"/v1/jobs/{job['id']}/artifacts/grid.png")
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png" and grid.content == PNG
    assert grid.headers["cache-control"] == "private, no-store"
    metrics = client.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json")
    assert metrics.json()["job_id"] == job["id"]
    body = is_problem(client.get(f"/v1/jobs/{job['id']}/artifacts/report.html"), 404)
    assert "grid.png" in body["detail"]


def test_submit_a_full_spec(client: TestClient, ids: dict[str, str]) -> None:
    created = client.post("/v1/jobs", json=full_spec(ids))
    assert created.status_code == 202, created.text
    assert created.json()["spec"]["attack"]["name"] == "inverting_gradients"
    assert wait_job(client, created.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"attack": {"name": "dlg"}},
        {"spec": {"model": {"arch": "lenet"}}, "update_id": "upd_x"},
    ],
)
def test_one_form_or_the_other(client: TestClient, body: dict[str, Any]) -> None:
    assert is_problem(client.post("/v1/jobs", json=body), 422)["code"] == "validation"


def test_the_update_must_belong_to_the_model(client: TestClient, ids: dict[str, str]) -> None:
    other_model = upload_all(client)["model"]
    body = is_problem(client.post("/v1/jobs", json=friendly_job(ids, model_id=other_model)), 422)
    assert "was uploaded for model" in body["detail"]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"attack": {"name": "gradinversion"}, "knowledge": 1}, "needs knowledge level 4"),
        ({"attack": {"name": "gias", "generator": "gen_x"}, "knowledge": 1}, "needs knowledge level 2"),
        ({"attack": {"name": "ggl", "generator": "gen_x"}}, "needs knowledge level 2"),
        ({"attack": {"name": "leakgpt"}}, "dlg"),
        ({"defenses": [{"name": "shuffle"}]}, "quantize"),
        ({"budget": {"iterations": 5000}}, "limit is 1000"),
        ({"budget": {"iterations": 5, "restarts": 8}}, "limit is 4"),
        ({"budget": {"iterations": 5, "time_limit_s": 3600}}, "limit is 600"),
        ({"seed": -1}, "seed"),
    ],
)
def test_checks_before_queueing(
    client: TestClient, ids: dict[str, str], changes: dict[str, Any], fragment: str
) -> None:
    body = is_problem(client.post("/v1/jobs", json=friendly_job(ids, **changes)), 422)
    assert fragment in body["detail"]
    assert client.get("/v1/jobs").json()["items"] == []


@pytest.mark.parametrize(
    ("changes", "status", "fragment"),
    [
        ({"ground_truth": "gt_" + "0" * 32}, 404, "no upload"),
        ({"ground_truth": "/etc/passwd"}, 404, "no upload"),
        ({"data": {"shape": [3, 16, 16], "num_images": 20}}, 422, "limit is 8"),
        ({"data": {"shape": [3, 32, 32], "num_images": 1}}, 422, "lenet"),
        ({"update": {"kind": "delta", "artifact": "X"}}, 404, "no upload 'X'"),
        ({"update": {"simulate": {"source": "folder", "path": "/data"}}}, 422, "sample photos only"),
        ({"update": {"simulate": {"images": ["holiday-snap"]}}}, 422, "unknown photo 'holiday-snap'"),
        ({"model": {"arch": "resnet18"}}, 422, "the spec asks for a resnet18"),
    ],
)
def test_full_spec_references_and_limits(
    client: TestClient, ids: dict[str, str], changes: dict[str, Any], status: int, fragment: str
) -> None:
    body = is_problem(client.post("/v1/jobs", json=full_spec(ids, **changes)), status)
    assert fragment in body["detail"]


def test_a_reference_to_the_wrong_kind_of_upload(client: TestClient, ids: dict[str, str]) -> None:
    body = is_problem(client.post("/v1/jobs", json=full_spec(ids, ground_truth=ids["update"])), 422)
    assert "needs a ground_truth upload" in body["detail"]


def test_idempotency_key(client: TestClient, ids: dict[str, str]) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/v1/jobs", json=friendly_job(ids), headers=headers)
    again = client.post("/v1/jobs", json=friendly_job(ids), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    conflict = client.post("/v1/jobs", json=friendly_job(ids, seed=7), headers=headers)
    assert is_problem(conflict, 409)["code"] == "idempotency_conflict"
    other = client.post("/v1/jobs", json=friendly_job(ids))
    assert other.json()["id"] != first.json()["id"]
    is_problem(client.post("/v1/jobs", json=friendly_job(ids), headers={"Idempotency-Key": "bad key!"}), 422)


def test_list_newest_first_with_pagination_and_filter(
    client: TestClient, runner: StubRunner, ids: dict[str, str]
) -> None:
    made = [client.post("/v1/jobs", json=friendly_job(ids)).json()["id"] for _ in range(3)]
    for job_id in made:
        wait_job(client, job_id)
    runner.gate = threading.Event()  # never opened: the next job waits until cancelled
    cancelled = client.post("/v1/jobs", json=friendly_job(ids)).json()["id"]
    client.delete(f"/v1/jobs/{cancelled}")
    assert wait_job(client, cancelled)["status"] == "cancelled"
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == [cancelled, made[2]]
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["items"]] == [made[1], made[0]]
    assert client.get("/v1/jobs", params={"limit": 2, "cursor": rest["next_cursor"]}).json() == {
        "items": [],
        "next_cursor": None,
    }
    succeeded = client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"]
    assert [j["id"] for j in succeeded] == made[::-1]
    is_problem(client.get("/v1/jobs", params={"cursor": "nonsense"}), 400)
    is_problem(client.get("/v1/jobs", params={"status": "sleeping"}), 422)


def test_cancel_waiting_running_and_finished_jobs(
    client: TestClient, runner: StubRunner, ids: dict[str, str]
) -> None:
    gate = threading.Event()
    runner.gate = gate  # hold the first job in `running` until the gate opens
    running = client.post("/v1/jobs", json=friendly_job(ids)).json()["id"]
    waiting = client.post("/v1/jobs", json=friendly_job(ids)).json()["id"]
    assert runner.started.wait(10)

    stopped = client.delete(f"/v1/jobs/{waiting}")
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    flagged = client.delete(f"/v1/jobs/{running}")
    assert flagged.status_code == 202 and flagged.json()["cancel_requested"]
    assert wait_job(client, running)["status"] == "cancelled"
    gate.set()

    done = client.post("/v1/jobs", json=friendly_job(ids)).json()["id"]
    wait_job(client, done)
    assert is_problem(client.delete(f"/v1/jobs/{done}"), 409)["code"] == "conflict"
    assert client.delete(f"/v1/jobs/{waiting}").json()["status"] == "cancelled"  # idempotent
    is_problem(client.delete("/v1/jobs/job_" + "0" * 32), 404)


def test_events_stream_until_the_job_ends(client: TestClient, ids: dict[str, str]) -> None:
    job_id = client.post("/v1/jobs", json=friendly_job(ids)).json()["id"]
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind is not None:
                events.append((kind, json.loads(line.removeprefix("data: "))))
    assert events[0][0] == "status"
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    statuses = [data["status"] for _, data in events]
    assert statuses == sorted(statuses, key=["queued", "running", "succeeded"].index)
    assert all(data["id"] == job_id for _, data in events)
    is_problem(client.get("/v1/jobs/job_" + "1" * 32 + "/events"), 404)


def test_unknown_and_malformed_job_ids_are_404(client: TestClient) -> None:
    for job_id in ("job_" + "0" * 32, "nonsense", "mdl_" + "0" * 32):
        is_problem(client.get(f"/v1/jobs/{job_id}"), 404)
        is_problem(client.get(f"/v1/jobs/{job_id}/artifacts"), 404)


@pytest.mark.parametrize("number", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_numbers_are_refused(client: TestClient, ids: dict[str, str], number: str) -> None:
    text = json.dumps(friendly_job(ids, attack={"name": "dlg", "lr": 1.0})).replace("1.0", number)
    response = client.post("/v1/jobs", content=text, headers={"content-type": "application/json"})
    assert "must be finite" in is_problem(response, 422)["detail"]


@pytest.mark.parametrize(
    ("budget", "iterations"),
    [({"time_limit_s": 60}, 5000), ({"time_limit_s": 60, "iterations": 7}, 7), ({}, 1000)],
)
def test_a_time_limit_alone_runs_as_many_iterations_as_the_server_allows(
    settings: Any, budget: dict[str, Any], iterations: int
) -> None:
    """The job's view states the iterations its budget allows: with only a time limit, the
    server's limit rather than the default count, which stopped such a job within seconds."""
    with TestClient(make_app(settings.model_copy(update={"max_iterations": 5000}), StubRunner())) as c:
        job = c.post("/v1/jobs", json=full_spec(upload_all(c), budget=budget)).json()
    assert job["spec"]["budget"]["iterations"] == iterations
    assert job["spec"]["budget"]["time_limit_s"] == budget.get("time_limit_s", settings.default_time_limit_s)
