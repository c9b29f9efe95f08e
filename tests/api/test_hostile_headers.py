"""Crafted safetensors headers through the HTTP API: every upload endpoint answers 4xx (or 201 for a
file that really fits), never 5xx; an unexpected error is a 500 whose log line carries the request
id and which keeps the connection open."""

from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from apitools import MODEL_META, StubRunner, lenet_files, make_app, post_file
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api.observability import RequestIdFilter
from service.settings import Settings

ENDPOINTS = ("/v1/models", "/v1/updates", "/v1/ground-truth", "/v1/generators")
ITEM_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
}
DTYPES = [*ITEM_SIZE, "F8_E4M3", "Q4", "", "f32"]
# The names the endpoints look for, so that some files get past the name checks to the shape checks.
NAMES = ["conv1.weight", "conv1.bias", "fc.weight", "fc.bias", "images", "labels"]
HUGE = [2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**70]
MAX_DATA = 4096  # bytes of tensor data a generated file holds at most

dims = st.integers(0, 9) | st.sampled_from(HUGE)
# An empty tensor claims no bytes whatever its other dimensions: the layout checks pass it.
empty_shapes = st.tuples(st.lists(dims, min_size=1, max_size=4), st.integers(0, 4)).map(
    lambda t: [*t[0][: t[1]], 0, *t[0][t[1] :]]
)
shapes = (
    st.lists(dims, max_size=5)
    | empty_shapes
    | st.lists(st.integers(0, 2), min_size=60, max_size=72)  # around torch's 64-dimension limit
    | st.sampled_from([[1, 3, 16, 16], [2, 1, 8, 8], [0, 3, 8, 8], [1, 3, 8, 2**62], [2**62, 3, 8, 0]])
)
offsets = st.lists(st.integers(0, 2**65) | st.sampled_from(HUGE), min_size=2, max_size=2)


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A file whose tensors are laid out end to end as their headers say (the interesting case: the
    parser's layout checks pass) or, at times, with offsets drawn at random."""
    header: dict[str, Any] = {}
    cursor = 0
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES) | st.text(max_size=6))
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(shapes)
        size = math.prod(shape) * ITEM_SIZE.get(dtype, 4)
        if cursor + size <= MAX_DATA and draw(st.booleans() | st.just(True)):
            span = [cursor, cursor + size]
            cursor += size
        else:
            span = draw(offsets)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": span}
    # Zeros are valid values for every endpoint (finite, in [0, 1]); random bytes test the value checks.
    data = draw(st.just(bytes(cursor)) | st.binary(min_size=cursor, max_size=cursor))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def safetensors_of(header: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# A valid generator manifest, so that generated headers sent as a generator reach the tensor checks.
GENERATOR_MANIFEST = {
    "gradleak.generator": json.dumps(
        {"arch": "mlp", "latent_dim": 4, "image_shape": [1, 8, 8], "trained_on": "x"}
    )
}


def header_for(endpoint: str, header: dict[str, Any]) -> dict[str, Any]:
    return {**header, "__metadata__": GENERATOR_MANIFEST} if endpoint == "/v1/generators" else header


def metadata_for(endpoint: str, model_id: str) -> dict[str, Any] | None:
    if endpoint == "/v1/models":
        return MODEL_META
    if endpoint == "/v1/updates":
        return {"model_id": model_id, "kind": "gradient", "num_images": 1, "normalization": "none"}
    return None


@pytest.fixture
def model_id(client: TestClient) -> str:
    response = post_file(client, "/v1/models", lenet_files()["weights"], MODEL_META)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


REPORTED = [
    # The examples: a dimension past int64 beside a zero one, and more than 64 dimensions.
    {"w": {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]}},
    {"images": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [0] * 65, "data_offsets": [0, 0]}},
    # Each dimension fits, their running product does not.
    {"w": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}},
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("header", REPORTED)
def test_reported_headers_are_refused_with_422(
    client: TestClient, model_id: str, endpoint: str, header: dict[str, Any]
) -> None:
    size = header[next(iter(header))]["data_offsets"][1]
    response = post_file(
        client,
        endpoint,
        safetensors_of(header_for(endpoint, header), bytes(size)),
        metadata_for(endpoint, model_id),
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "artifact"


def test_a_long_hostile_header_is_not_echoed_whole(client: TestClient) -> None:
    header = {"w" * 5000: {"dtype": "F32", "shape": [7] * 5000, "data_offsets": [0, 4]}}
    response = post_file(client, "/v1/ground-truth", safetensors_of(header, bytes(4)), None)
    assert response.status_code == 422 and len(response.json()["detail"]) < 400, response.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=safetensors_files())
@example(data=safetensors_of({"images": {"dtype": "F32", "shape": [1, 3, 8, 2**62], "data_offsets": [0, 0]}}))
def test_no_generated_header_gives_a_5xx(
    client: TestClient, model_id: str, endpoint: str, data: bytes
) -> None:
    response = post_file(client, endpoint, data, metadata_for(endpoint, model_id))
    assert response.status_code in (201, 415, 422), response.text


# --- unexpected errors: request id in the log, keep-alive kept -----------------------------------


@pytest.fixture
def boom_server(settings: Settings) -> Iterator[int]:
    """The API under uvicorn on a free loopback port, with a route that fails unexpectedly."""
    app = make_app(settings, StubRunner())

    async def boom() -> None:
        raise RuntimeError("internals")

    app.add_api_route("/boom", boom)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30.0)
        sock.close()


def test_a_500_keeps_the_connection_and_logs_the_request_id(
    boom_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    conn = http.client.HTTPConnection("127.0.0.1", boom_server, timeout=10)
    try:
        conn.request("GET", "/boom", headers={"X-Request-ID": "trace-500"})
        response = conn.getresponse()
        body = json.loads(response.read())
        local = conn.sock.getsockname()
        assert response.status == 500 and body["code"] == "internal" and body["request_id"] == "trace-500"
        assert response.getheader("X-Request-ID") == "trace-500" and not response.will_close
        conn.request("GET", "/healthz")
        again = conn.getresponse()
        again.read()
        assert again.status == 200 and conn.sock.getsockname() == local  # the same connection
    finally:
        conn.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.request_id) for r in errors] == [("gradleak.api", "trace-500")]  # type: ignore[attr-defined]
    assert "internals" in caplog.text  # the details are in the log, not in the response
