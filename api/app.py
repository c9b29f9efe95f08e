"""The gradleak REST API: `create_app(settings)` builds it; `gradleak serve` runs it.

Importing this module does not import torch: the engine is imported lazily by the routes that
need it (uploads, job checks, the catalog), and jobs run in a worker process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Scope

from api import errors
from api.errors import PROBLEM_JSON
from api.middleware import BodyLimit, BodyLimitMiddleware, RequestContextMiddleware
from api.observability import Metrics
from api.routes import catalog, federations, health, jobs, studies, trainings, uploads
from api.runtime import QueueFactory, Runtime, auth_enabled, default_queue
from api.schemas import Problem
from service import __version__
from service.jobs.budget import ProfileFn
from service.settings import Settings, get_settings

log = logging.getLogger("gradleak.api")

JSON_BODY_LIMIT = 1 << 20  # job specs and other JSON bodies are small
MULTIPART_OVERHEAD = 64 << 10  # boundaries, part headers and the metadata part of an upload

DESCRIPTION = """
gradleak audits federated-learning client updates for training-data leakage by running gradient
inversion attacks the way a curious server would.

1. Upload the model (`POST /v1/models`), the client's update (`POST /v1/updates`) and, to score
   the result, the client's own images (`POST /v1/ground-truth`): multipart/form-data with a
   `file` part (safetensors) and a `metadata` part (JSON).
2. Submit a job (`POST /v1/jobs`) naming those uploads, or a full JobSpec; follow it with
   `GET /v1/jobs/{id}` or its event stream; download its artifacts.

Authenticate with `Authorization: Bearer <key>` (`gradleak keys create`). Every error is an
`application/problem+json` body with a request id.
"""

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_RESPONSE: dict[str, Any] = {
    "description": "an error (RFC 9457 problem details)",
    "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
}


def create_app(
    settings: Settings | None = None,
    *,
    queue_factory: QueueFactory | None = None,
    profiler: ProfileFn | None = None,
) -> FastAPI:
    """The API. `queue_factory` replaces the queue chosen from the settings and `profiler` the
    child process that profiles models for the memory budget (tests use both)."""
    settings = settings or get_settings()
    auth_enabled(settings)  # refuse at once a configuration that would serve without keys

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.open(settings, metrics, queue_factory or default_queue, profiler)
        app.state.runtime = runtime
        log.info(
            "gradleak API ready: queue %s, API keys %s",
            "arq on Redis" if settings.redis_url else "embedded",
            "required" if runtime.auth else "not required (loopback only)",
        )
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="gradleak",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    metrics = Metrics(lambda: getattr(getattr(app.state, "runtime", None), "state", None))
    errors.install(app)
    for module in (uploads, jobs, federations, studies, trainings, catalog):
        app.include_router(module.router, responses={"default": PROBLEM_RESPONSE})
    app.include_router(health.router, responses={"default": PROBLEM_RESPONSE})

    upload_limit = BodyLimit(settings.max_upload_bytes + MULTIPART_OVERHEAD, settings.max_upload_bytes)
    json_limit = BodyLimit(JSON_BODY_LIMIT, JSON_BODY_LIMIT)

    def limit_for(scope: Scope) -> BodyLimit:
        return upload_limit if scope["path"] in uploads.UPLOAD_PATHS else json_limit

    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: ids and metrics for all

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
