"""Retries, backoff, Retry-After and idempotency keys, through httpx's MockTransport; every error
status maps to its exception with status, detail and request id."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

import gradleak_client as gl
from gradleak_client._base import INITIAL_RETRY_DELAY, MAX_RETRY_AFTER, MAX_RETRY_DELAY

URL = "http://gradleak.test"
NOW = "2026-01-01T00:00:00Z"
JOB = {
    "id": "job_0123",
    "status": "queued",
    "created_at": NOW,
    "updated_at": NOW,
    "expires_at": NOW,
    "attempts": 0,
    "max_attempts": 3,
    "spec": {},
    "links": {"self": "/v1/jobs/job_0123", "events": "/v1/jobs/job_0123/events", "artifacts": "a"},
}


def problem(status: int, code: str = "x", detail: str = "went wrong", **headers: str) -> httpx.Response:
    body = {
        "type": f"urn:gradleak:problem:{code}",
        "title": "t",
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": f"req_server{status}",
    }
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json", **headers})


class Recorder:
    """A MockTransport handler answering from a script of responses (or exceptions to raise)."""

    def __init__(self, script: list[httpx.Response | Exception]) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def make_client(recorder: Recorder, sleeps: list[float], **kw: Any) -> gl.Client:
    client = gl.Client(base_url=URL, api_key="glk_test", transport=httpx.MockTransport(recorder), **kw)
    client._sleep = sleeps.append  # type: ignore[method-assign,assignment]
    return client


def test_post_retried_on_5xx_with_one_idempotency_key_and_fresh_request_ids() -> None:
    recorder = Recorder([problem(503), problem(500), httpx.Response(202, json=JOB)])
    sleeps: list[float] = []
    job = make_client(recorder, sleeps).jobs.create(update_id="upd_1", attack={"name": "dlg"})
    assert job.id == "job_0123" and job.status == "queued"
    assert len(recorder.requests) == 3
    keys = {r.headers["idempotency-key"] for r in recorder.requests}
    assert len(keys) == 1 and next(iter(keys)).startswith("glc-")
    assert len({r.headers["x-request-id"] for r in recorder.requests}) == 3
    assert all(r.headers["authorization"] == "Bearer glk_test" for r in recorder.requests)
    assert json.loads(recorder.requests[0].content) == {"update_id": "upd_1", "attack": {"name": "dlg"}}
    # exponential backoff with jitter: attempt n waits 0.5 * 2**n, shortened by up to a quarter
    assert len(sleeps) == 2
    for n, delay in enumerate(sleeps):
        full = min(INITIAL_RETRY_DELAY * 2**n, MAX_RETRY_DELAY)
        assert 0.75 * full <= delay <= full


def test_a_given_idempotency_key_is_sent_on_every_attempt() -> None:
    recorder = Recorder([httpx.ConnectError("refused"), httpx.Response(202, json=JOB)])
    make_client(recorder, []).jobs.create(update_id="upd_1", idempotency_key="my-key-1")
    assert [r.headers["idempotency-key"] for r in recorder.requests] == ["my-key-1", "my-key-1"]


def test_get_has_no_idempotency_key() -> None:
    recorder = Recorder([httpx.Response(200, json=JOB)])
    make_client(recorder, []).jobs.get("job_0123")
    assert "idempotency-key" not in recorder.requests[0].headers


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retry_after_seconds_is_honoured(status: int) -> None:
    recorder = Recorder([problem(status, **{"Retry-After": "3"}), httpx.Response(200, json=JOB)])
    sleeps: list[float] = []
    make_client(recorder, sleeps).jobs.get("job_0123")
    assert sleeps == [3.0]


def test_retry_after_http_date_is_honoured() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    recorder = Recorder(
        [problem(429, **{"Retry-After": format_datetime(when, usegmt=True)}), httpx.Response(200, json=JOB)]
    )
    sleeps: list[float] = []
    make_client(recorder, sleeps).jobs.get("job_0123")
    assert len(sleeps) == 1 and 25.0 <= sleeps[0] <= 30.0


def test_a_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    recorder = Recorder(
        [problem(429, code="rate_limited", **{"Retry-After": str(int(MAX_RETRY_AFTER) + 60)})]
    )
    sleeps: list[float] = []
    with pytest.raises(gl.RateLimitError) as info:
        make_client(recorder, sleeps).jobs.get("job_0123")
    assert sleeps == [] and info.value.retry_after == MAX_RETRY_AFTER + 60


def test_retries_give_up_after_max_retries_with_the_last_error() -> None:
    recorder = Recorder([problem(503), problem(503), problem(503, detail="still down")])
    sleeps: list[float] = []
    with pytest.raises(gl.ServerError) as info:
        make_client(recorder, sleeps, max_retries=2).jobs.get("job_0123")
    assert len(recorder.requests) == 3 and len(sleeps) == 2
    assert info.value.status == 503 and info.value.detail == "still down"


def test_max_retries_zero_sends_once() -> None:
    recorder = Recorder([problem(503)])
    with pytest.raises(gl.ServerError):
        make_client(recorder, [], max_retries=0).jobs.get("job_0123")
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422])
def test_client_errors_are_not_retried(status: int) -> None:
    recorder = Recorder([problem(status)])
    sleeps: list[float] = []
    with pytest.raises(gl.APIStatusError):
        make_client(recorder, sleeps).jobs.get("job_0123")
    assert len(recorder.requests) == 1 and sleeps == []


def test_connection_errors_are_retried_then_raised_with_the_request_id() -> None:
    recorder = Recorder([httpx.ConnectError("refused")] * 3)
    sleeps: list[float] = []
    with pytest.raises(gl.APIConnectionError) as info:
        make_client(recorder, sleeps).catalog.get()
    assert len(recorder.requests) == 3 and len(sleeps) == 2
    assert info.value.status is None
    assert info.value.request_id == recorder.requests[-1].headers["x-request-id"]
    assert not isinstance(info.value, gl.APITimeoutError)


def test_timeouts_are_retried_then_raised_as_timeout_errors() -> None:
    recorder = Recorder([httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow")])
    with pytest.raises(gl.APITimeoutError) as info:
        make_client(recorder, [], max_retries=1).jobs.get("job_0123")
    assert info.value.code == "timeout" and isinstance(info.value, gl.APIConnectionError)


def test_a_non_gradleak_answer_is_a_response_validation_error() -> None:
    recorder = Recorder([httpx.Response(200, text="<html>proxy login</html>")])
    with pytest.raises(gl.APIResponseValidationError, match="not a Job"):
        make_client(recorder, []).jobs.get("job_0123")


def test_the_async_client_retries_the_same_way() -> None:
    recorder = Recorder(
        [problem(429, **{"Retry-After": "2"}), httpx.ConnectError("reset"), httpx.Response(202, json=JOB)]
    )
    sleeps: list[float] = []

    async def run() -> gl.Job:
        client = gl.AsyncClient(base_url=URL, transport=httpx.MockTransport(recorder))

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        client._sleep = sleep  # type: ignore[method-assign]
        async with client:
            return await client.jobs.create(update_id="upd_1")

    job = asyncio.run(run())
    assert job.id == "job_0123" and len(recorder.requests) == 3
    assert len({r.headers["idempotency-key"] for r in recorder.requests}) == 1
    assert sleeps[0] == 2.0 and 0.75 * 1.0 <= sleeps[1] <= 1.0
    assert "authorization" not in recorder.requests[0].headers  # no key configured, none sent


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADLEAK_URL", "https://audit.example/gradleak/")
    monkeypatch.setenv("GRADLEAK_API_KEY", "glk_env")
    recorder = Recorder([httpx.Response(200, json=JOB)])
    client = gl.Client(transport=httpx.MockTransport(recorder))
    client.jobs.get("job_0123")
    assert str(recorder.requests[0].url) == "https://audit.example/gradleak/v1/jobs/job_0123"
    assert recorder.requests[0].headers["authorization"] == "Bearer glk_env"


# ---------------------------------------------------------------------------------------------
# every status to its exception
# ---------------------------------------------------------------------------------------------

STATUS_CLASSES: list[tuple[int, type[gl.APIStatusError]]] = [
    (400, gl.BadRequestError),
    (401, gl.UnauthorizedError),
    (403, gl.PermissionDeniedError),
    (404, gl.NotFoundError),
    (408, gl.RequestTimeoutError),
    (409, gl.ConflictError),
    (413, gl.BadRequestError),
    (415, gl.BadRequestError),
    (422, gl.UnprocessableEntityError),
    (429, gl.RateLimitError),
    (500, gl.ServerError),
    (503, gl.ServerError),
]


@pytest.mark.parametrize(("status", "cls"), STATUS_CLASSES)
def test_each_status_maps_to_its_exception(status: int, cls: type[gl.APIStatusError]) -> None:
    recorder = Recorder([problem(status, code=f"code{status}", detail=f"detail {status}")])
    with pytest.raises(cls) as info:
        make_client(recorder, [], max_retries=0).jobs.get("job_0123")
    error = info.value
    assert type(error) is cls
    assert isinstance(error, gl.APIError) and isinstance(error, gl.GradleakError)
    assert (error.status, error.detail, error.code) == (status, f"detail {status}", f"code{status}")
    assert error.request_id == f"req_server{status}"
    assert f"request id req_server{status}" in str(error)


def test_an_error_without_a_problem_body_keeps_the_text_and_header_request_id() -> None:
    response = httpx.Response(502, text="Bad Gateway from the proxy", headers={"X-Request-ID": "req_proxy"})
    with pytest.raises(gl.ServerError) as info:
        make_client(Recorder([response]), [], max_retries=0).jobs.get("job_0123")
    assert info.value.detail == "Bad Gateway from the proxy" and info.value.request_id == "req_proxy"
    assert info.value.body is None


def test_unprocessable_entity_exposes_the_checks_details() -> None:
    body = json.loads(problem(422).content)
    body.update(
        {
            "valid": ["dlg", "inverting_gradients"],
            "mismatches": ["missing: fc.weight"],
            "errors": [{"loc": ["x"]}],
        }
    )
    recorder = Recorder([httpx.Response(422, json=body)])
    with pytest.raises(gl.UnprocessableEntityError) as info:
        make_client(recorder, []).jobs.get("job_0123")
    assert info.value.valid == ["dlg", "inverting_gradients"]
    assert info.value.mismatches == ["missing: fc.weight"] and info.value.errors == [{"loc": ["x"]}]
