"""Artifacts on S3 (moto's server through the minio SDK): presigned redirects, except for the HTML
report, which the API serves itself so that it always carries its sandboxing Content-Security-Policy
(an S3 response cannot carry one)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from apitools import StubRunner, friendly_job, make_app, upload_all, wait_job
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from service.jobs.types import REPORT_HTML, JobContext, JobResult
from service.settings import Settings
from service.specs import JobSpec

REPORT = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class ReportingRunner(StubRunner):
    """The stand-in runner, plus a report.html."""

    def __call__(self, spec: JobSpec, ctx: JobContext) -> JobResult:
        result = super().__call__(spec, ctx)
        key = f"{ctx.prefix}/{REPORT_HTML}"
        ctx.store.put_bytes(key, REPORT, "text/html; charset=utf-8")
        return JobResult(
            status=result.status, manifest=result.manifest, artifacts={**result.artifacts, REPORT_HTML: key}
        )


@pytest.fixture
def s3_client(settings: Settings, s3_endpoint: str) -> Iterator[TestClient]:
    on_s3 = settings.model_copy(
        update={
            "s3_endpoint": s3_endpoint,
            "s3_access_key": SecretStr("test-access"),
            "s3_secret_key": SecretStr("test-secret"),
            "s3_bucket": f"gradleak-test-{uuid.uuid4().hex[:12]}",
            "s3_region": "us-east-1",
            "s3_secure": False,
        }
    )
    with TestClient(make_app(on_s3, ReportingRunner())) as c:
        yield c


def test_a_report_on_s3_is_served_sandboxed_and_other_artifacts_are_presigned(s3_client: TestClient) -> None:
    job = s3_client.post("/v1/jobs", json=friendly_job(upload_all(s3_client))).json()
    assert wait_job(s3_client, job["id"])["status"] == "succeeded"
    base = f"/v1/jobs/{job['id']}/artifacts"

    listed = {a["name"]: a for a in s3_client.get(base).json()["items"]}
    assert listed[REPORT_HTML]["presigned_url"] is None
    assert listed["grid.png"]["presigned_url"] is not None

    report = s3_client.get(f"{base}/{REPORT_HTML}", follow_redirects=False)
    assert report.status_code == 200 and report.content == REPORT
    policy = report.headers["content-security-policy"]
    assert policy.startswith("sandbox;") and "default-src 'none'" in policy

    grid = s3_client.get(f"{base}/grid.png", follow_redirects=False)
    assert grid.status_code == 307
    presigned = httpx.get(grid.headers["location"])  # what the redirect leads to: S3 itself
    assert presigned.status_code == 200 and presigned.headers["content-type"] == "image/png"
