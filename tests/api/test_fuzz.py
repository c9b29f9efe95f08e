"""No input makes the API fail with a 5xx: property-based tests of the upload and job endpoints,
and schemathesis against /openapi.json."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from apitools import MODEL_META, StubRunner, make_app, post_file
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.settings import Settings

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
safetensors_headers = st.dictionaries(
    st.text(max_size=12),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "Q4", ""]),
            "shape": st.lists(st.integers(-2, 6), max_size=4),
            "data_offsets": st.lists(st.integers(-1, 96), max_size=3),
        }
    ),
    max_size=3,
)


def stored(settings_: Settings) -> list[str]:
    root = settings_.data_dir / "artifacts"
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(client: TestClient, settings: Settings, data: bytes) -> None:
    response = post_file(client, "/v1/models", data, MODEL_META)
    assert response.status_code in (415, 422), response.text
    assert stored(settings) == []


@FUZZ
@given(
    header=safetensors_headers, payload=st.binary(max_size=96), declared=st.none() | st.integers(0, 2**64 - 1)
)
def test_hostile_safetensors_headers_are_refused_cleanly(
    client: TestClient, settings: Settings, header: dict[str, Any], payload: bytes, declared: int | None
) -> None:
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text) if declared is None else declared) + text + payload
    response = post_file(client, "/v1/models", data, MODEL_META)
    assert 400 <= response.status_code < 500, response.text
    assert stored(settings) == []


@FUZZ
@given(body=json_values)
def test_random_job_requests_never_fail_the_server(client: TestClient, body: Any) -> None:
    text = json.dumps(body)  # NaN and Infinity included: Python's JSON parser reads them
    response = client.post("/v1/jobs", content=text, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text


@FUZZ
@given(metadata=json_values)
def test_random_upload_metadata_never_fails_the_server(client: TestClient, metadata: Any) -> None:
    response = post_file(client, "/v1/updates", b"\x00" * 16, json.dumps(metadata))
    assert 400 <= response.status_code < 500, response.text


@pytest.fixture
def schema_app(settings: Settings, keys: dict[str, str]) -> Iterator[FastAPI]:
    yield make_app(settings.model_copy(update={"auth_required": True}), StubRunner())
    asgi.shutdown_lifespans()  # schemathesis starts the app's lifespan on the first request


def test_openapi_conformance(schema_app: FastAPI, keys: dict[str, str]) -> None:
    """Every operation, with schemathesis' default checks (no 5xx, documented statuses, content
    types and bodies) except "schema-valid data is accepted": a schema cannot say "a safetensors
    file that fits this architecture", so such requests are rightly refused with 4xx. (The pytest
    plugin's lazy fixtures do not work with this pytest; each operation gets a hypothesis test.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", schema_app)
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err would raise here, as it should

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(
                headers={"Authorization": keys["acme"]}, excluded_checks=[positive_data_acceptance]
            )

        check()
