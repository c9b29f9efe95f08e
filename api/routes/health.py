"""Probes and metrics: /healthz (the process is up), /readyz (state store, artifact store and
queue answer), /metrics (Prometheus). None of them needs a key or shows tenant data."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import RuntimeDep
from api.errors import ApiError
from api.schemas import Health, Ready

router = APIRouter(tags=["operations"])
log = logging.getLogger("gradleak.api")

CHECK_TIMEOUT_S = 5.0


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Ready, summary="Readiness", responses={503: {"description": "not ready"}}
)
async def readyz(rt: RuntimeDep) -> Ready:
    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "state": lambda: run_in_threadpool(rt.state.ping),
        "store": lambda: run_in_threadpool(rt.store.ping),
        "queue": rt.queue.ping,
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
            results[name] = "ok"
        except Exception as e:  # any failure means "not ready"; the log has the details
            log.warning("readiness: %s check failed: %s", name, e)
            results[name] = f"failed ({type(e).__name__})"
    failed = [n for n, r in results.items() if r != "ok"]
    if failed:
        raise ApiError(
            503, f"not ready: {', '.join(failed)} unavailable", code="not_ready", extra={"checks": results}
        )
    return Ready(status="ready", checks=results)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
def metrics(rt: RuntimeDep) -> Response:
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)
